"""Visual-token reduction in transformers' LLaVA (tokenthrift.vlm): keep = all is the unreduced model (logits and
generated tokens) for every reducer; each reducer's kept tokens equal a slow per-image reference; a mixed batch
(prompts of different lengths, padded) generates what each prompt generates alone; the prompt rewriting refuses
what it cannot match. Tiny random LlavaConfig models, no hub, as transformers' own tests build them."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenthrift import vlm
from tokenthrift.errors import InvalidArgumentError, StateError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

IMAGE = 99
N = 16  # 32 px, patch 8: a 4 x 4 grid


@pytest.fixture(scope="module")
def llava():
    t = transformers
    torch.manual_seed(0)
    vision = t.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, pad_token_id=0)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projector_hidden_act="gelu",
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    return t.LlavaForConditionalGeneration(config).eval()


def _prompt(before, after, images=1):
    return [*before, *([IMAGE] * N * images), *after]


def _batch(prompts, left=True):
    width = max(map(len, prompts))
    pad = [[0] * (width - len(p)) for p in prompts]
    ids = torch.tensor([(q + p) if left else (p + q) for p, q in zip(prompts, pad)])
    return ids, (ids != 0).long()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", vlm.METHODS)
def test_keeping_every_token_is_the_unreduced_model(llava, pixels, method):
    ids, mask = _batch([_prompt([1, 5], [7, 8]), _prompt([1], [9, 10, 11])])
    with torch.no_grad():
        logits = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        tokens = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4,
                                do_sample=False)
        vlm.reduce(llava, ratio=1.0, method=method)
        try:
            assert torch.equal(llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, logits)
            assert torch.equal(llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                              max_new_tokens=4, do_sample=False), tokens)
        finally:
            vlm.remove(llava)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"


def _features(llava, pixels):
    with torch.no_grad():
        out = llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", return_dict=True)
    return torch.stack(list(out.pooler_output))


def _divprune_reference(x, k):
    """One image at a time, one candidate at a time."""
    kept = []
    for image in x:
        unit = F.normalize(image, dim=-1)
        mean = F.normalize(unit.mean(0), dim=0)
        chosen = [int(max(range(len(unit)), key=lambda i: float(1 - unit[i] @ mean)))]
        while len(chosen) < k:
            best = max((i for i in range(len(unit)) if i not in chosen),
                       key=lambda i: min(float(1 - unit[i] @ unit[j]) for j in chosen))
            chosen.append(best)
        kept.append(sorted(chosen))
    return torch.tensor(kept)


def _merge_reference(x, k):
    """ToMe's bipartite matching, one image at a time with explicit groups: (positions, sizes, features)."""
    out = []
    for image in x:
        groups = [[i] for i in range(len(image))]  # patches of each token, the first member its position
        feats = [image[i] for i in range(len(image))]
        while len(feats) > k:
            n = len(feats)
            r = min(n - k, n // 2)
            a, b = list(range(0, n, 2)), list(range(1, n, 2))
            sim = torch.stack([F.normalize(feats[i], dim=0) for i in a]) @ torch.stack(
                [F.normalize(feats[j], dim=0) for j in b]).T
            best, partner = sim.max(1)
            merged = set(best.topk(r).indices.tolist())
            new_groups, new_feats = {}, {}
            for rank, i in enumerate(a):
                if rank not in merged:
                    new_groups[("a", i)], new_feats[("a", i)] = groups[i], feats[i]
            for j in b:
                members = [j] + [a[rank] for rank in merged if b[int(partner[rank])] == j]
                sizes = torch.tensor([len(groups[m]) for m in members], dtype=image.dtype)
                new_feats[("b", j)] = sum(s * feats[m] for s, m in zip(sizes, members)) / sizes.sum()
                new_groups[("b", j)] = groups[j] + [p for m in members[1:] for p in groups[m]]
            order = sorted(new_groups, key=lambda key: new_groups[key][0])  # by the position each stands at
            groups, feats = [new_groups[key] for key in order], [new_feats[key] for key in order]
        out.append(([g[0] for g in groups], [len(g) for g in groups], torch.stack(feats)))
    return out


def test_every_reducer_keeps_what_a_slow_reference_keeps(llava, pixels):
    x = _features(llava, pixels)
    k = 6
    _, positions, _ = vlm.reduce_tokens(x, k, "divprune")
    assert torch.equal(positions, _divprune_reference(x, k))

    kept, positions, sizes = vlm.reduce_tokens(x, k, "merge")
    for (where, size, feats), p, s, f in zip(_merge_reference(x, k), positions, sizes, kept):
        assert p.tolist() == where and s.tolist() == size
        torch.testing.assert_close(f, feats, atol=1e-5, rtol=1e-5)

    kept, positions, sizes = vlm.reduce_tokens(x, 4, "pool", grid=(4, 4))
    grid = x.transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(kept, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    assert sizes.tolist() == [[4] * 4] * 2

    first = vlm.reduce_tokens(x, k, "random", generator=torch.Generator().manual_seed(3))[1]
    again = vlm.reduce_tokens(x, k, "random", generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(first, again) and all(len(set(row.tolist())) == k for row in first)


def test_the_attention_reducer_ranks_by_the_towers_cls_attention(llava, pixels):
    """Its scores equal the attention maps the tower itself returns (eager) in the layer LLaVA reads."""
    tower = llava.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        maps = tower(pixels, output_attentions=True).attentions  # one per layer
        handle = vlm.reduce(llava, keep=5, method="attention")
        ids, mask = _batch([_prompt([1], [2]), _prompt([1], [3])])
        llava(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    vlm.remove(llava)
    tower.set_attn_implementation("sdpa")
    cls = maps[-2][:, :, 0, 1:].mean(1)  # vision_feature_layer -2: the output of the second-to-last layer
    assert torch.equal(handle.last_positions, cls.topk(5, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("keep", [8, 4])
@pytest.mark.parametrize("method", ["divprune", "merge", "pool", "tower-merge"])
def test_a_mixed_batch_generates_what_each_prompt_generates_alone(llava, pixels, method, keep):
    prompts = [_prompt([1, 5, 6], [7]), _prompt([1], [9, 10, 11, 12, 13])]
    vlm.reduce(llava, keep=keep, method=method)
    try:
        with torch.no_grad():
            ids, mask = _batch(prompts)
            together = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4,
                                      do_sample=False)
            for i, prompt in enumerate(prompts):
                alone = llava.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels[i:i + 1],
                                       max_new_tokens=4, do_sample=False)
                assert torch.equal(together[i, -4:], alone[0, -4:])
                assert together.shape[1] == ids.shape[1] + 4  # the caller's prompt, then the new tokens
    finally:
        vlm.remove(llava)


def test_two_images_in_one_prompt_and_labels(llava, pixels):
    """A prompt with two images: each image's run of placeholders is cut to K, and the labels with it."""
    ids, mask = _batch([_prompt([1], [2, 3], images=2)], left=False)
    labels = ids.clone()
    labels[ids == IMAGE] = -100
    handle = vlm.reduce(llava, keep=9, method="divprune")
    try:
        with torch.no_grad():
            out = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
        assert out.logits.shape[1] == 1 + 2 * 9 + 2 and out.loss is not None and math.isfinite(out.loss)
        assert handle.last_positions.shape == (2, 9)
    finally:
        vlm.remove(llava)


def test_what_cannot_match_is_refused(llava, pixels):
    with pytest.raises(InvalidArgumentError, match="give keep"):
        vlm.reduce(llava)
    with pytest.raises(InvalidArgumentError, match="unknown reducer"):
        vlm.reduce(llava, keep=4, method="fastest")
    vlm.reduce(llava, keep=4)
    try:
        with pytest.raises(StateError, match="already"):
            vlm.reduce(llava, keep=4)
        ids = torch.tensor([_prompt([1], [2])[:-3]])  # a placeholder run cut short
        with pytest.raises(InvalidArgumentError, match="placeholders"):
            llava(input_ids=ids, pixel_values=pixels[:1])
    finally:
        vlm.remove(llava)
    with pytest.raises(InvalidArgumentError, match="a x b"):
        vlm.reduce_tokens(torch.randn(1, 16, 8), 7, "pool", grid=(4, 4))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        vlm.reduce(torch.nn.Linear(2, 2), keep=2)


def test_merging_in_the_tower_reads_k_tokens_from_the_layer_llava_takes(llava, pixels):
    """ToMe's r per layer reaches CLS + K tokens at vision_feature_layer; the sizes hold every patch once."""
    handle = vlm.reduce(llava, keep=6, method="tower-merge")
    try:
        ids, mask = _batch([_prompt([1], [2]), _prompt([1], [3])])
        with torch.no_grad():
            out = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        assert out.logits.shape[1] == 1 + 6 + 1
        assert handle.last_sizes.sum(1).tolist() == [N, N]
        assert all(row.tolist() == sorted(row.tolist()) for row in handle.last_positions)
        assert type(llava.model.vision_tower).__name__ == "CLIPVisionModel"  # ToMe only for the call
    finally:
        vlm.remove(llava)
    from tokenthrift.vlm.llava import _tower_schedule

    assert _tower_schedule(17, 1, 10, 2, 3) == [5, 5, 0]  # evenly where it can
    assert _tower_schedule(17, 1, 12, 2, 3) == [8, 4, 0]  # 16 -> 4 in two layers: only by halving twice
    with pytest.raises(InvalidArgumentError, match="cannot reach"):
        _tower_schedule(17, 1, 13, 2, 3)


# ---------------------------------------------------------------------------------------------- Qwen2-VL
QN = 16  # a 32 x 32 image, patch 4: 8 x 8 patches, merged 2 x 2: a 4 x 4 grid of visual tokens


@pytest.fixture(scope="module")
def qwen():
    t = transformers
    torch.manual_seed(0)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=100, max_position_embeddings=256, pad_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    config = t.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=98,
                             vision_start_token_id=97, vision_end_token_id=96)
    return t.Qwen2VLForConditionalGeneration(config).eval()


def _qwen_inputs(prompts, images):
    ids, mask = _batch(prompts)
    grid = torch.tensor([[1, 8, 8]] * images)
    pixels = torch.randn(64 * images, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(images))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == IMAGE).int()}


def _qprompt(before, after):
    return [*before, 97, *([IMAGE] * QN), 96, *after]


@pytest.mark.parametrize("method", [m for m in vlm.REDUCERS if m != "attention"])  # no CLS in Qwen2-VL's tower
def test_qwen2vl_keeping_every_token_is_the_unreduced_model(qwen, method):
    inputs = _qwen_inputs([_qprompt([1, 5], [7, 8]), _qprompt([1], [9, 10, 11, 12])], 2)
    with torch.no_grad():
        logits = qwen(**inputs).logits
        tokens = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
        vlm.reduce(qwen, ratio=1.0, method=method)
        try:
            assert torch.equal(qwen(**inputs).logits, logits)
            assert torch.equal(qwen.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
        finally:
            vlm.remove(qwen)


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_qwen2vl_kept_tokens_keep_their_m_rope_positions(qwen, method):
    """A selecting reducer gives exactly what the unreduced model gives with the dropped visual tokens masked out and
    every token at its original position: nothing is renumbered, and generation goes on from the same positions."""
    inputs = _qwen_inputs([_qprompt([1, 5], [7, 8, 9])], 1)
    handle = vlm.reduce(qwen, keep=5, method=method, seed=2)
    try:
        with torch.no_grad():
            reduced = qwen(**inputs).logits[:, -1]
            tokens = qwen.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        vlm.remove(qwen)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, _ = qwen.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=mask)
    dropped = mask.clone()
    first = int((ids[0] == IMAGE).nonzero()[0])
    kept = set(handle.last_positions[0].tolist())
    for rank in range(QN):
        if rank not in kept:
            dropped[0, first + rank] = 0
    index = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        reference = qwen(**{**inputs, "attention_mask": dropped},
                         position_ids=torch.cat([index[None], full])).logits[:, -1]
    torch.testing.assert_close(reduced, reference, atol=1e-5, rtol=1e-5)
    assert tokens.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("keep", [8, 4])
def test_qwen2vl_mixed_batch_generates_what_each_prompt_generates_alone(qwen, keep):
    prompts = [_qprompt([1, 5, 6], [7]), _qprompt([1], [9, 10, 11, 12, 13])]
    both = _qwen_inputs(prompts, 2)
    vlm.reduce(qwen, keep=keep, method="merge")
    try:
        with torch.no_grad():
            together = qwen.generate(**both, max_new_tokens=3, do_sample=False)
            for i, prompt in enumerate(prompts):
                alone = {**_qwen_inputs([prompt], 1), "pixel_values": both["pixel_values"][64 * i:64 * (i + 1)],
                         "image_grid_thw": both["image_grid_thw"][i:i + 1]}
                assert torch.equal(together[i, -3:], qwen.generate(**alone, max_new_tokens=3, do_sample=False)[0, -3:])
    finally:
        vlm.remove(qwen)
    with pytest.raises(UnsupportedModelError, match="reduce after it"):
        vlm.reduce(qwen, keep=4, method="attention")


# ---------------------------------------------------------------------------------------------- proportional attention
def test_merged_tokens_weigh_by_size_in_the_language_model(llava, pixels):
    """With prop_attn, the reduced LLaVA equals its language model run with an explicit mask that adds log(size) to
    every merged token's key (eager, by hand); without, it differs; and the bias never outlives its prompt."""
    from tokenthrift.vlm import sized

    ids, mask = _batch([_prompt([1, 5], [7, 8]), _prompt([1, 2, 3, 4], [9])])
    config = llava.model.language_model.config
    with torch.no_grad():
        vlm.reduce(llava, keep=6, method="merge")
        try:
            merged = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
            reduced = llava._reduced_inputs(ids, pixels, mask, None, None, None, None)
            new_ids, new_mask, encoded = reduced["input_ids"], reduced["attention_mask"], reduced["mm_encoder_outputs"]
            bias = sized._BIAS[id(config)].clone()
            text_only = llava(input_ids=ids[:, :3]).logits  # a new prompt without images: no bias left over
        finally:
            vlm.remove(llava)
        assert config._attn_implementation == "sdpa" and not sized._BIAS
        torch.testing.assert_close(text_only, llava(input_ids=ids[:, :3]).logits)
        B, L = new_ids.shape
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & new_mask.bool()[:, None, :]
        explicit = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        reference = llava(input_ids=new_ids, mm_encoder_outputs=encoded,
                          position_ids=(new_mask.cumsum(1) - 1).clamp_min(0),
                          attention_mask=explicit + bias[:, None, None, :]).logits
        real = new_mask.bool()
        torch.testing.assert_close(merged[real], reference[real], atol=1e-5, rtol=1e-5)
        assert bias.max() > 0 and bool((bias[new_ids != IMAGE] == 0).all())  # log(size) on visual keys only
        vlm.reduce(llava, keep=6, method="merge", prop_attn=False)
        try:
            counted_once = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        finally:
            vlm.remove(llava)
        assert not torch.allclose(counted_once, merged, atol=1e-3)


def test_proportional_attention_needs_a_float_mask(llava):
    config = llava.model.language_model.config
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(UnsupportedModelError, match="eager or sdpa"):
            vlm.reduce(llava, keep=4, method="merge")
        vlm.reduce(llava, keep=4, method="merge", prop_attn=False)
        vlm.remove(llava)
    finally:
        config._attn_implementation = "sdpa"
