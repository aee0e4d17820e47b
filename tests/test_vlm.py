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
    """The authors' DivPrune (vbdi/divprune, LLaVA's prepare_inputs_labels_for_multimodal), one image at a time:
    cosine distance matrix, the first pick the largest second-smallest value of a column, then each step the largest
    column minimum over the rows picked so far."""
    kept = []
    for image in x:
        unit = image / image.norm(dim=1, keepdim=True)
        distance = 1.0 - unit @ unit.t()
        chosen = []
        for i in range(k):
            if i == 0:
                scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
            else:
                scores = torch.min(distance[torch.tensor(chosen)], dim=0).values
            chosen.append(int(torch.argmax(scores)))
        kept.append(sorted(chosen))
    return torch.tensor(kept)


def _visionzip_reference(hidden, attentions, keys, dominant, contextual):
    """The authors' VisionZip (dvlab-research/VisionZip, CLIPVisionTower_VisionZip.forward), one image at a time and
    one token at a time: the class token's attention summed over heads ranks the patches; the class token and the
    dominant - 1 most attended patches, in sequence order; the rest's head-mean keys normalised, every
    (R // contextual)-th a target, the others assigned to their most similar target; target + mean of its members.
    Returns (tokens (M, K, D), kept patch indices of the dominant tokens, target patch indices)."""
    out, tops, targets_all = [], [], []
    for h, a, kk in zip(hidden, attentions, keys):
        score = a[:, 0, 1:].sum(0)
        top = sorted((score.topk(dominant - 1).indices + 1).tolist())
        dominant_tokens = [h[0]] + [h[i] for i in top]
        rest = [i for i in range(1, h.shape[0]) if i not in top]
        metric = torch.stack([kk[i] / kk[i].norm() for i in rest])
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        members = {t: [] for t in targets}
        for j in range(len(rest)):
            if j not in targets:
                sims = torch.stack([metric[j] @ metric[t] for t in targets])
                members[targets[int(sims.argmax())]].append(j)
        ctx = [h[rest[t]] + (sum(h[rest[j]] for j in members[t]) / max(1, len(members[t])) if members[t] else 0)
               for t in targets]
        out.append(torch.stack(dominant_tokens + ctx))
        tops.append([i - 1 for i in top])
        targets_all.append([rest[t] - 1 for t in targets])
    return torch.stack(out), tops, targets_all


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

    first = vlm.reduce_tokens(x, k, "random", seed=3)[1]
    again = vlm.reduce_tokens(x.flip(0), k, "random", seed=3)[1]  # another image in each slot: the same draw
    assert torch.equal(first, again) and all(len(set(row.tolist())) == k for row in first)
    assert not torch.equal(first, vlm.reduce_tokens(x, k, "random", seed=4)[1])


def test_divprune_keeps_what_the_authors_code_keeps_at_llava_size():
    """At LLaVA-1.5's 576 tokens (random features, in fp32 and bf16: theirs runs in the model's precision)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 576, 256, generator=g).to(dtype)
        x[1, 300] = x[1, 7]  # a duplicate: its nearest neighbour is at distance 0
        for k in (1, 32, 64):
            _, positions, _ = vlm.reduce_tokens(x, k, "divprune")
            assert torch.equal(positions, _divprune_reference(x, k)), (dtype, k)


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


@pytest.mark.parametrize("keep", [8, 12])
def test_visionzip_gives_the_language_model_what_the_authors_code_gives_it(llava, pixels, keep):
    """Dominant and contextual tokens built by the authors' algorithm from the tower's own eager attention maps,
    hidden states and keys (one image at a time), projected: the reduced LLaVA equals the plain LLaVA given those
    tokens for K placeholders per image."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tower = llava.model.vision_tower
    layer = tower.encoder.layers[-2]
    captured = []
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
        tower.set_attn_implementation("sdpa")
    keys = captured[0].view(2, N + 1, 4, -1).mean(2)  # head-mean keys, (M, T, d)
    dominant, contextual = vlm.reducers.visionzip_split(keep)
    tokens, top, targets = _visionzip_reference(out.hidden_states[-2], out.attentions[-2], keys, dominant, contextual)
    prompts = [_prompt([1, 5], [7, 8]), _prompt([1], [9, 10, 11])]
    ids, mask = _batch(prompts)
    handle = vlm.reduce(llava, keep=keep, method="visionzip")
    try:
        with torch.no_grad():
            reduced = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    finally:
        vlm.remove(llava)
    assert handle.last_positions[:, 0].tolist() == [-1, -1]  # the class token
    assert handle.last_positions[:, 1:dominant].tolist() == top
    assert handle.last_positions[:, dominant:].tolist() == targets
    assert handle.last_sizes.sum(1).tolist() == [dominant + N - (dominant - 1)] * 2  # every patch once, + the class
    cut = [[*p[:p.index(IMAGE)], *([IMAGE] * keep), *p[p.index(IMAGE) + N:]] for p in prompts]
    ids2, mask2 = _batch(cut)
    with torch.no_grad():
        features = llava.model.multi_modal_projector(tokens)
        reference = llava(input_ids=ids2, attention_mask=mask2, mm_encoder_outputs={
            "image": BaseModelOutputWithPooling(pooler_output=list(features))}).logits
    torch.testing.assert_close(reduced, reference, atol=1e-5, rtol=1e-5)


def test_visionzip_keeps_the_authors_split_per_budget():
    assert [vlm.reducers.visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert vlm.reducers.visionzip_split(1) == (1, 0)  # the class token alone


def test_the_random_reducer_keeps_the_same_tokens_of_an_image_wherever_it_sits(llava, pixels):
    """Per image, not per batch slot: the same image twice in a batch keeps the same tokens, and a batch equals its
    prompts alone."""
    twice = torch.cat([pixels[:1], pixels[:1]])
    ids, mask = _batch([_prompt([1], [2]), _prompt([1], [2])])
    handle = vlm.reduce(llava, keep=5, method="random", seed=1)
    try:
        with torch.no_grad():
            both = llava(input_ids=ids, pixel_values=twice, attention_mask=mask).logits
            assert torch.equal(handle.last_positions[0], handle.last_positions[1])
            torch.testing.assert_close(both[0], both[1])
            alone = llava(input_ids=ids[:1], pixel_values=pixels[:1]).logits
            torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
    finally:
        vlm.remove(llava)


def test_keep_is_a_whole_number_of_the_tokens_an_image_has(llava, pixels):
    with pytest.raises(InvalidArgumentError, match="whole number"):
        vlm.reduce(llava, keep=3.5)
    with pytest.raises(InvalidArgumentError, match="whole number"):
        vlm.reduce(llava, keep=0)
    vlm.reduce(llava, keep=4.0)  # a whole number written as a float is that number
    vlm.remove(llava)
    vlm.reduce(llava, keep=100)
    try:
        ids, mask = _batch([_prompt([1], [2])])
        with pytest.raises(InvalidArgumentError, match=f"keep=100 visual tokens, but an image here has only {N}"):
            llava(input_ids=ids, pixel_values=pixels[:1], attention_mask=mask)
    finally:
        vlm.remove(llava)


@pytest.mark.parametrize("keep", [8, 4])
@pytest.mark.parametrize("method", ["random", "divprune", "merge", "pool", "tower-merge", "visionzip"])
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
    for method in ("attention", "tower-merge", "visionzip"):
        with pytest.raises(UnsupportedModelError, match="reduce after it with random, pool, divprune, merge$"):
            vlm.reduce(qwen, keep=4, method=method)


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


@pytest.mark.parametrize("train", [False, True])
def test_reducing_leaves_every_module_in_the_models_mode(llava, train):
    llava.train(train)
    try:
        for method in ("divprune", "visionzip"):
            vlm.reduce(llava, keep=4, method=method)
            assert all(m.training == train for m in llava.modules())
            vlm.remove(llava)
    finally:
        llava.eval()
