"""ToMe and ToE against slow transcriptions of their authors' algorithms (the project rule: where the authors' code
exists, our default computes what it computes).

The references below are written for this file, per image and token by token, from a reading of the authors' code
(facebookresearch/ToMe: ``tome/merge.py``, ``tome/patch/timm.py``, ``tome/utils.py``; Osilly/TokenExpansion:
``ToE/deit/model/token_select.py`` and ``deit_expansion.py``). They follow what that code computes, step by step,
including its rounding order and its output order; nothing of ours is reused in them.

ToMe, as their code runs a timm ViT (eval mode):
  * every block: attention written out per head with log(size) of every key added to the logits once a merge has
    happened (proportional attention; no bias before the first merge), the residual, then the merge, then the MLP;
  * the matching metric is the attention keys averaged over heads, divided by their norm;
  * the sets are the even (A) and odd (B) positions of the whole sequence, class token included; the class token is
    protected by a score row of -inf (it is A's first token), a distillation token by a score column of -inf (B's
    first token); ``r = min(r, (t - protected) // 2)``;
  * every A token's best B token and score; A tokens ranked by score, descending; the first r merge into their B
    token by size-weighted average (sums of x·size and of size), the rest stay and, with a class token, are put
    back in position order; the output is the unmerged A tokens then all B tokens (with a distillation token:
    A[0], B[0], A[1:], B[1:]);
  * ``parse_r``: (r, inflection) gives ``int(lo + step·i)`` with ``lo = int(r·(1 - inflection))``,
    ``step = (2r - 2lo) / (depth - 1)``, the step computed first.
Our token order equals theirs on these models (the class token is protected), so logits *and* source maps are
compared directly.

ToE (their ``TokenSelect``, applied before block 1 when the stage is above 0 and not the last stage at keep rate 1):
  * one class token split off; seeds ``i % int(1 // r0) == 0`` while fewer than ``int(N·r0)``;
  * stage s < last adds ``int(N·(r_s - r_{s-1}))``; the last stage (keep rate below 1) adds
    ``int(N·r_last) - int(N·(r0 + sum of the earlier steps))``; each stage in k chunks (k-1 of count // k);
  * per chunk, on tokens divided by their norms: every unselected token's best score over the selected ones, the
    chunk's tokens are those with the lowest best scores (ascending argsort), appended after the selected ones;
  * merge: every unselected token goes to the selected token with its best score; each selected token becomes the
    mean of itself and those (``scatter_reduce`` mean, self included);
  * output: class token, then the selected tokens in their order (seeds, then chunk by chunk, in score order).
Our operator orders the kept tokens by patch index (SPEC §2 step 5, a documented decision: the blocks after it are
permutation-equivariant, positions having been added before block 0, and the head reads the class token), so the
kept set and the merged values are compared after sorting theirs by patch index.

Distances other than cosine: their code scores with the distance itself, between normalised tokens, and keeps the
same max/argmax as for the cosine (the farthest selected token counts, a token merges into the farthest one). Ours
are true distances on the raw tokens (SPEC §2 options: nearest = smallest distance, farthest = largest): a
documented divergence, pinned below as a strict xfail next to a test that ours is their algorithm with only the
score replaced.
"""
import bisect
import math

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.toe import ToESchedule, token_expansion


# ================================================================= ToMe: the authors' algorithm, per image
def authors_parse_r(depth, r):
    """Their r schedule: an int for every block, a list padded with zeros, or (r, inflection) stepped linearly."""
    if isinstance(r, list):
        return r + [0] * max(depth - len(r), 0)
    inflection = 0
    if isinstance(r, tuple):
        r, inflection = r
    lowest = int(r * (1.0 - inflection))
    highest = 2 * r - lowest
    increment = (highest - lowest) / (depth - 1)  # the step first ...
    out = []
    for i in range(depth):
        out.append(int(lowest + increment * i))  # ... then lowest + step * i, rounded down
    return out


def authors_attention(blk, x, size):
    """Explicit multi-head attention of one image's tokens x (t, D), log(size) on every key when sizes exist.
    Returns the attention output (before the residual) and the keys averaged over heads (t, d)."""
    attn = blk.attn
    t = x.shape[0]
    qkv = attn.qkv(blk.norm1(x)).reshape(t, 3, attn.num_heads, attn.head_dim)
    heads, keys = [], []
    for h in range(attn.num_heads):
        q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
        logits = (q @ k.T) * attn.scale
        if size is not None:
            logits = logits + torch.log(size)[None, :]
        heads.append(torch.softmax(logits, dim=-1) @ v)
        keys.append(k)
    out = attn.proj(torch.cat(heads, dim=-1))
    return out, torch.stack(keys).mean(0)


def authors_merge(x, size, source, metric, r, class_token, distill_token):
    """Bipartite soft matching of one image, A token by A token. x (t, D), size (t,), source (t, N0) 0/1 rows."""
    t = x.shape[0]
    r = min(r, (t - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        return x, size, source
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    best_score, best_b = [], []
    for slot, p in enumerate(a_pos):
        row = torch.stack([unit[p] @ unit[q] for q in b_pos])
        if class_token and slot == 0:
            row = torch.full_like(row, -math.inf)
        if distill_token:
            row[0] = -math.inf
        j = int(torch.argmax(row))
        best_score.append(float(row[j]))
        best_b.append(j)
    ranked = sorted(range(len(a_pos)), key=lambda s: -best_score[s])  # descending score
    merging, staying = ranked[:r], ranked[r:]
    if class_token:
        staying = sorted(staying)
    # size-weighted sums into the B tokens (their merge_wavg: merge(x * size, "sum") / merge(size, "sum"))
    b_sum = [x[q] * size[q] for q in b_pos]
    b_size = [size[q].clone() for q in b_pos]
    b_src = [source[q].clone() for q in b_pos]
    for s in merging:
        p, j = a_pos[s], best_b[s]
        b_sum[j] = b_sum[j] + x[p] * size[p]
        b_size[j] = b_size[j] + size[p]
        b_src[j] = torch.maximum(b_src[j], source[p])  # their merge_source: amax
    a_x = [x[a_pos[s]] * size[a_pos[s]] / size[a_pos[s]] for s in staying]
    a_size = [size[a_pos[s]] for s in staying]
    a_src = [source[a_pos[s]] for s in staying]
    b_x = [b_sum[j] / b_size[j] for j in range(len(b_pos))]
    if distill_token:
        order = lambda a, b: [a[0], b[0], *a[1:], *b[1:]]  # noqa: E731
    else:
        order = lambda a, b: [*a, *b]  # noqa: E731
    return (torch.stack(order(a_x, b_x)), torch.stack(order(a_size, b_size)), torch.stack(order(a_src, b_src)))


def authors_tome_forward(model, images, r, prop_attn=True):
    """Their ToMe timm ViT (ToMeBlock, ToMeAttention, parse_r), one image at a time: logits (B, classes) and the
    final source maps (B, t_final, N0)."""
    depth = len(model.blocks)
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    logits, sources = [], []
    for image in images:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
        t0 = x.shape[0]
        size, source = None, torch.eye(t0)
        todo = authors_parse_r(depth, r)
        for blk in model.blocks:
            out, metric = authors_attention(blk, x, size if prop_attn else None)
            x = x + out
            r_blk = todo.pop(0)
            if r_blk > 0:
                x, size, source = authors_merge(x, torch.ones(x.shape[0]) if size is None else size, source, metric,
                                                r_blk, class_token, distill_token)
            x = x + blk.mlp(blk.norm2(x))
        logits.append(model.forward_head(model.norm(x[None]))[0])
        sources.append(source)
    return torch.stack(logits), torch.stack(sources)


def perturbed(name="vit_tiny_patch16_224", **kw):
    """A tiny timm ViT (as tests/test_evit.py builds it), weights moved off their initial values."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    model = timm.create_model(name, pretrained=False, **{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for blk in model.blocks:  # their block has no LayerScale: the transcription is only valid without it
        assert isinstance(blk.ls1, torch.nn.Identity) and isinstance(blk.ls2, torch.nn.Identity)
        assert isinstance(blk.attn.q_norm, torch.nn.Identity)
    return model


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name,r", [("vit_tiny_patch16_224", 6), ("vit_tiny_patch16_224", (8, 0.5)),
                                    ("vit_tiny_patch16_224", (7, -1.0)), ("vit_tiny_patch16_224", [3, 0, 12, 9]),
                                    ("deit_tiny_distilled_patch16_224", 6),
                                    ("deit_tiny_distilled_patch16_224", (6, 1.0))])
def test_tome_forward_equals_the_authors_forward(name, r, batch):
    """Same per-block r, same logits and the same source map (which original tokens every final token holds, in
    the same order) as their algorithm; the distilled DeiT checks their distillation-token protection and order."""
    model = perturbed(name)
    images = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        expected, expected_source = authors_tome_forward(model, images, r)
        handle = tt.tome.apply(model, r, trace_source=True)
        assert handle.schedule() == authors_parse_r(4, r)
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(handle.last_source, expected_source)
    assert torch.equal(handle.last_size[..., 0], expected_source.sum(-1))


def test_tome_without_proportional_attention_equals_the_authors():
    model = perturbed()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, _ = authors_tome_forward(model, images, 7, prop_attn=False)
        tt.tome.apply(model, 7, prop_attn=False)
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_tome_deep_schedule_whose_last_r_their_rounding_decides():
    """(15, 1.0) over 12 blocks: their parse_r ends at 29 (16/11·11 rounds below 16); (hi - lo)·i / 11 would end
    at 30. Here the whole 12-block forward (256 patch tokens, so every r fits) must merge what theirs merges."""
    model = perturbed(img_size=64, depth=12)
    images = torch.randn(1, 3, 64, 64)
    assert authors_parse_r(12, (15, 1.0))[-1] == 29
    with torch.no_grad():
        expected, expected_source = authors_tome_forward(model, images, (15, 1.0))
        handle = tt.tome.apply(model, (15, 1.0), trace_source=True)
        got = model(images)
    assert handle.schedule() == authors_parse_r(12, (15, 1.0))
    assert handle.last_source.shape[1] == expected_source.shape[1] == 257 - 174
    assert torch.equal(handle.last_source, expected_source)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_tome_schedule_is_their_parse_r_everywhere():
    inflections = [-1.0, -0.75, -0.5, -1 / 3, -0.25, -0.1, 0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0]
    for depth in (2, 3, 4, 6, 8, 12, 14, 16, 24, 32):
        for r in range(0, 40):
            assert tt.tome.block_schedule(r, depth) == authors_parse_r(depth, r)
            for inflection in inflections:
                assert tt.tome.block_schedule((r, inflection), depth) == authors_parse_r(depth, (r, inflection)), \
                    (depth, r, inflection)
    assert tt.tome.block_schedule([5, 2], 4) == authors_parse_r(4, [5, 2])


# ================================================================= ToE: the authors' operator, per image
def _normalised(t):
    return t / t.norm()


def authors_score(distance):
    """Their get_score, one token against a stack of tokens (both already divided by their norms)."""
    if distance == "cosine":
        return lambda u, sel: sel @ u
    if distance == "manhattan":
        return lambda u, sel: (u[None] - sel).abs().sum(-1)
    return lambda u, sel: ((u[None] - sel) ** 2).sum(-1).sqrt()


def documented_score(distance):
    """Ours, as SPEC §2 decides: cosine as theirs; the other two as true distances on the raw tokens (negated, so
    that "best" is the nearest). Only the score differs from theirs; the rest of authors_toe is unchanged."""
    if distance == "cosine":
        return authors_score("cosine")
    p = 1 if distance == "manhattan" else 2
    return lambda u, sel: -torch.linalg.vector_norm(u[None] - sel, ord=p, dim=-1)


def authors_toe(x, r0, keep_rates, milestones, k, epoch, distance="cosine", score=None, normalise=True):
    """Their TokenSelect on block-0 output x (B, 1 + N, D) at ``epoch``: None where it does nothing, else the tokens
    (B, 1 + M, D) and the kept patch indices (B, M), both in their order (seeds, then chunk by chunk)."""
    stage = bisect.bisect_right(list(milestones), epoch)
    last = len(milestones)
    if stage == 0 or (stage == last and keep_rates[-1] == 1.0):
        return None
    steps = [keep_rates[0] - r0] + [keep_rates[i] - keep_rates[i - 1] for i in range(1, len(keep_rates))]
    score = score or authors_score(distance)
    prep = _normalised if normalise else (lambda t: t)
    outs, indices = [], []
    for image in x:
        cls, patches = image[:1], image[1:]
        N = patches.shape[0]
        seeds, every = int(N * r0), int(1 // r0)
        selected, unselected = [], []
        for i in range(N):
            (selected if i % every == 0 and len(selected) < seeds else unselected).append(i)
        for s in range(1, stage + 1):
            if s == last:
                count = int(N * keep_rates[-1]) - int(N * (r0 + sum(steps[: s - 1])))
            else:
                count = int(N * steps[s - 1])
            for c in range(1, k + 1):
                chunk = count // k if c < k else count - (k - 1) * (count // k)
                sel = torch.stack([prep(patches[i]) for i in selected])
                best = {u: float(score(prep(patches[u]), sel).max()) for u in unselected}
                ranked = sorted(unselected, key=lambda u: best[u])  # ascending
                selected, unselected = selected + ranked[:chunk], ranked[chunk:]
        sel = torch.stack([prep(patches[i]) for i in selected])
        groups = [[i] for i in selected]
        for u in unselected:
            groups[int(score(prep(patches[u]), sel).argmax())].append(u)
        merged = torch.stack([patches[g].mean(0) for g in groups])
        outs.append(torch.cat([cls, merged]))
        indices.append(torch.tensor(selected))
    return torch.stack(outs), torch.stack(indices)


def ours_at(x, schedule, epoch):
    """Our operator as the training hook calls it at ``epoch`` (None where the hook does nothing)."""
    if schedule.is_full(epoch):
        return None
    rates = schedule.rates(epoch)
    return token_expansion(x, rates, schedule.r0, schedule.k, 1, schedule.distance,
                           last_stage=len(rates) == len(schedule.keep_rates))


def assert_same_kept_set_and_values(ours, theirs):
    """Ours orders the kept tokens by patch index (SPEC §2 step 5), theirs seeds-then-chunks: compare after putting
    theirs in patch order. The class token comes first in both."""
    (tokens, index), (ref_tokens, ref_index) = ours, theirs
    order = ref_index.argsort(dim=1)
    assert torch.equal(index, ref_index.gather(1, order))
    ref_patches = ref_tokens[:, 1:].gather(1, order[..., None].expand(-1, -1, ref_tokens.shape[-1]))
    torch.testing.assert_close(tokens[:, :1], ref_tokens[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 1:], ref_patches, rtol=1e-5, atol=1e-6)


TOE_CASES = [  # (N, r0, keep_rates, milestones, k, epochs)
    (64, 0.25, (0.5, 0.75, 1.0), (0, 100, 200), 2, (0, 150, 250)),  # DeiT recipe: stages 1, 2, then full
    (49, 0.2, (0.4, 0.7, 1.0), (0, 100, 200), 2, (50, 150)),  # LV-ViT rates (int(1 // 0.2) = 4)
    (36, 0.3, (0.6, 0.8, 1.0), (0, 10, 20), 3, (5, 15)),  # EfficientTrain rates, k = 3
    (49, 0.25, (0.5, 0.7), (0, 1), 2, (0, 1)),  # last stage below 1: their top-up adds 10, not int(49·0.2) = 9
    (36, 0.25, (0.6, 0.8, 0.9), (0, 1, 2), 1, (2,)),  # top-up 4 where int(36·0.1) = 3
]


@pytest.mark.parametrize("N,r0,keep_rates,milestones,k,epochs", TOE_CASES)
def test_toe_operator_keeps_and_merges_what_the_authors_do(N, r0, keep_rates, milestones, k, epochs):
    torch.manual_seed(N + k)
    x = torch.randn(3, 1 + N, 24)
    schedule = ToESchedule(r0=r0, keep_rates=keep_rates, milestones=milestones, k=k)
    for epoch in epochs:
        theirs = authors_toe(x, r0, keep_rates, milestones, k, epoch)
        ours = ours_at(x, schedule, epoch)
        if theirs is None:
            assert ours is None
            continue
        assert_same_kept_set_and_values(ours, theirs)
        for b in range(3):  # and image by image (the batch does not leak between images)
            assert_same_kept_set_and_values(ours_at(x[b:b + 1], schedule, epoch), (theirs[0][b:b + 1],
                                                                                  theirs[1][b:b + 1]))


def test_toe_last_stage_count_is_theirs_not_the_plain_step():
    """Their last stage (keep rate below 1) tops up to int(N·r_last) - int(N·(r0 + steps)): 34 of 49 tokens kept
    at (0.25; 0.5, 0.7), where int(N·step) per stage would keep 33. The training hook passes last_stage."""
    n0, chunks = tt.toe.expansion_sizes(49, 0.25, (0.5, 0.7), 2, last_stage=True)
    assert n0 + sum(chunks) == 34 == int(49 * 0.7)
    n0, chunks = tt.toe.expansion_sizes(49, 0.25, (0.5, 0.7), 2)
    assert n0 + sum(chunks) == 33  # an earlier stage's rates (the schedule goes on): int(N·step) as theirs


def test_toe_training_hook_feeds_block_1_what_the_authors_operator_gives():
    """The whole patch in training: block 1 receives their operator's output on block 0's output (up to their
    order), at a middle stage and at a last stage below full tokens."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5)
    handle = tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 0.7), milestones=(0, 1), k=2)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("block0", out.detach().clone()),
                                          prepend=True)  # before ToE's hook replaces the output
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("block1", a[0].detach().clone()))
    images = torch.randn(2, 3, 28, 28)
    model.train()
    for epoch, kept in [(0, 24), (1, 34)]:
        handle.set_epoch(epoch)
        with torch.no_grad():
            model(images)
        theirs = authors_toe(seen["block0"], 0.25, (0.5, 0.7), (0, 1), 2, epoch)
        assert theirs[1].shape[1] == kept
        assert_same_kept_set_and_values((seen["block1"], handle.last_patch_index), theirs)


@pytest.mark.parametrize("distance", ["euclidean", "manhattan"])
def test_toe_other_distances_are_their_algorithm_with_true_distances(distance):
    """Ours with euclidean/manhattan = their operator with the score replaced by the negated distance between the
    raw tokens (SPEC §2: true distances); every other step (seeds, counts, chunks, merge) is theirs."""
    torch.manual_seed(1)
    x = torch.randn(3, 1 + 64, 24) * torch.rand(3, 1 + 64, 1) * 3  # norms that vary: raw != normalised
    schedule = ToESchedule(r0=0.25, keep_rates=(0.5, 0.75, 1.0), milestones=(0, 100, 200), k=2, distance=distance)
    for epoch in (0, 150):
        theirs = authors_toe(x, 0.25, (0.5, 0.75, 1.0), (0, 100, 200), 2, epoch,
                             score=documented_score(distance), normalise=False)
        assert_same_kept_set_and_values(ours_at(x, schedule, epoch), theirs)


@pytest.mark.xfail(strict=True, reason="documented divergence (SPEC §2 options): their code scores euclidean/"
                   "manhattan with the distance between normalised tokens under the cosine's max/argmax, so the farthest "
                   "selected token decides and a token merges into the farthest one; ours are true distances")
@pytest.mark.parametrize("distance", ["euclidean", "manhattan"])
def test_toe_other_distances_literally_as_their_code(distance):
    torch.manual_seed(1)
    x = torch.randn(2, 1 + 64, 24)
    schedule = ToESchedule(r0=0.25, keep_rates=(0.5, 0.75, 1.0), milestones=(0, 100, 200), k=2, distance=distance)
    assert_same_kept_set_and_values(ours_at(x, schedule, 0), authors_toe(x, 0.25, (0.5, 0.75, 1.0), (0, 100, 200), 2,
                                                                         0, distance))


@pytest.mark.xfail(strict=True, reason="documented divergence (docs/methods.md §2 schedule: stage 0, before the first "
                   "milestone, keeps only the r0 seeds): their TokenSelect does nothing at stage 0 (all tokens); "
                   "every paper recipe starts at milestone 0, where the two agree")
def test_toe_before_the_first_milestone_as_their_code():
    x = torch.randn(2, 1 + 64, 24)
    assert authors_toe(x, 0.25, (0.5, 0.75, 1.0), (10, 20, 30), 2, 5) is None
    assert ours_at(x, ToESchedule(milestones=(10, 20, 30)), 5) is None
