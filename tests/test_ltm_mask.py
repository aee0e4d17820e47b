"""LTM mask module: layout, invariants, and the hot path against a slow dense reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenthrift.ltm.mask import (
    MIN_TOKENS,
    STENCIL,
    TokenMerger,
    compose,
    merge,
    merge_mask,
    seeds,
    stencil,
    target_grid,
    unmerge,
)


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize("grid,count,expected", [
    ((14, 14), 182, (14, 13)),   # exact count; tie 13x14/14x13 -> larger h'
    ((14, 14), 169.2, (13, 13)),
    ((14, 14), 196, (14, 14)),   # nothing to merge
    ((14, 14), 500, (14, 14)),
    ((7, 5), 30, (6, 5)),        # odd, non-square grids
    ((7, 5), 1, (2, 2)),         # never below the 4-token floor
    ((7, 5), 4.4, (2, 2)),
    ((5, 1), 2, (4, 1)),
    ((2, 2), 1, (2, 2)),         # a grid at the floor is kept
    ((3, 1), 1, (3, 1)),
])
def test_target_grid_is_the_closest_smaller_grid_above_the_floor(grid, count, expected):
    assert target_grid(grid, count) == expected
    h2, w2 = target_grid(grid, count)
    allowed = [a * b for a in range(1, grid[0] + 1) for b in range(1, grid[1] + 1) if a * b >= MIN_TOKENS]
    if grid[0] * grid[1] > MIN_TOKENS:
        assert MIN_TOKENS == 4 and h2 * w2 >= 4
        assert abs(h2 * w2 - count) == min(abs(n - count) for n in allowed) and h2 <= grid[0] and w2 <= grid[1]


@pytest.mark.parametrize("grid,target", [((14, 14), (13, 14)), ((7, 7), (4, 3)), ((5, 9), (5, 2)), ((6, 6), (1, 1))])
def test_stencil_is_the_dilated_cell_locality_prior(grid, target):
    (h, w), (h2, w2) = grid, target
    home, cand, valid = stencil(grid, target)
    N, M = h * w, h2 * w2
    assert cand.shape == (N, STENCIL) and torch.bincount(home, minlength=M).min() >= 1  # cells tile the grid
    for m in range(M):  # every cell is a rectangle of whole source rows and columns, in grid order
        rows, cols = (home == m).nonzero().squeeze(1).div(w, rounding_mode="floor"), (home == m).nonzero() % w
        r, c = sorted(set(rows.tolist())), sorted(set(cols.squeeze(1).tolist()))
        assert r == list(range(r[0], r[-1] + 1)) and c == list(range(c[0], c[-1] + 1)) and len(rows) == len(r) * len(c)
        assert r[0] == math.ceil((m // w2) * h / h2) and c[0] == math.ceil((m % w2) * w / w2)
    for n in range(N):
        a, b = divmod(int(home[n]), w2)
        allowed = {r * w2 + c for r in range(a - 1, a + 2) for c in range(b - 1, b + 2) if 0 <= r < h2 and 0 <= c < w2}
        assert set(cand[n][valid[n]].tolist()) == allowed
        assert (cand[n][~valid[n]] == M).all()


# ---------------------------------------------------------------- slow dense reference (docs/methods.md §4, written out)
def reference(z, sizes, grid, target, tau_s, tau_g=1.0, gumbel=None):
    """Dense (B, N, M) version of docs/methods.md §4 steps 1-6, with the straight-through hard mask when ``gumbel``
    (B, N, 9) is given. Loops over sources/targets to build the locality mask; tensors for the rest."""
    (h, w), (h2, w2) = grid, target
    B, N, _ = z.shape
    M = h2 * w2
    cell_r = [i * h2 // h for i in range(h)]
    cell_c = [j * w2 // w for j in range(w)]
    home = torch.tensor([cell_r[n // w] * w2 + cell_c[n % w] for n in range(N)])
    allowed = torch.zeros(N, M, dtype=torch.bool)
    slot_of = torch.full((N, M), -1)
    for n in range(N):
        a, b = divmod(int(home[n]), w2)
        for k, (da, db) in enumerate([(da, db) for da in (-1, 0, 1) for db in (-1, 0, 1)]):
            if 0 <= a + da < h2 and 0 <= b + db < w2:
                allowed[n, (a + da) * w2 + b + db] = True
                slot_of[n, (a + da) * w2 + b + db] = k
    s = sizes.float()
    sw = s.clamp_min(1e-6)
    T = torch.stack([(z[:, home == m] * sw[:, home == m, None]).sum(1) / sw[:, home == m].sum(1, keepdim=True)
                     for m in range(M)], 1)
    E = -(F.normalize(z, dim=-1)[:, :, None] - F.normalize(T, dim=-1)[:, None]).pow(2).sum(-1)  # (B, N, M)
    E = E.masked_fill(~allowed, float("-inf"))
    W = (E / tau_s).softmax(dim=1)  # over sources, per target
    if gumbel is None:
        H = F.one_hot((E / tau_s).argmax(-1), M).float()
    else:
        g = torch.zeros(B, N, M)
        for n in range(N):
            for m in range(M):
                if allowed[n, m]:
                    g[:, n, m] = gumbel[:, n, slot_of[n, m]]
        y = ((E / tau_s + g) / tau_g).softmax(-1)
        H = F.one_hot(y.argmax(-1), M).float() - y.detach() + y
    num = H * W * s[..., None]
    chosen = F.one_hot(H.argmax(-1), M).float()
    den = (num * chosen).sum(1, keepdim=True)  # the chosen sources of each column
    count = chosen.sum(1)
    # a non-chosen slot is normalised as if its source joined the column (0 in value either way)
    norm = torch.where(count[:, None] > 0, den, torch.ones_like(den)) + (1 - chosen) * W * s[..., None]
    G = torch.where(count[:, None] > 0, num / norm, 0 * num)
    merged = torch.where(count[..., None] > 0, G.transpose(1, 2) @ z, T)
    new_sizes = (F.one_hot(H.argmax(-1), M).float() * s[..., None]).sum(1)
    return G, merged, new_sizes, count


CASES = [((6, 6), (4, 5), 0.1), ((7, 5), (4, 3), 0.5), ((5, 8), (5, 6), 0.05)]


@pytest.mark.parametrize("affinity", ["dense", "sparse"])
@pytest.mark.parametrize("grid,target,tau", CASES)
def test_hot_path_matches_dense_reference_in_eval(grid, target, tau, affinity):
    torch.manual_seed(0)
    B, D = 3, 8
    N = grid[0] * grid[1]
    z = torch.randn(B, N, D, dtype=torch.float64).float()
    sizes = torch.randint(1, 4, (B, N)).float()
    mask = merge_mask(z, sizes, grid, target, tau_s=tau, affinity=affinity)
    G, merged, new_sizes, count = reference(z, sizes, grid, target, tau)
    torch.testing.assert_close(mask.dense(), G, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merge(z, mask, own_seeds=True), merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merge(z, mask), merged, rtol=1e-4, atol=1e-5)  # seeds pooled from x itself
    assert torch.equal(mask.sizes, new_sizes) and torch.equal(mask.count, count)


@pytest.mark.parametrize("grid,target,tau", CASES)
def test_straight_through_forward_and_gradient_match_the_reference(grid, target, tau):
    torch.manual_seed(1)
    B, D = 2, 6
    N = grid[0] * grid[1]
    z = torch.randn(B, N, D, requires_grad=True)
    sizes = torch.randint(1, 3, (B, N)).float()
    gumbel = -torch.empty(B, N, STENCIL).exponential_().log()
    probe = torch.randn(B, target[0] * target[1], D)

    mask = merge_mask(z, sizes, grid, target, tau_s=tau, tau_g=0.7, stochastic=True, gumbel=gumbel)
    out = merge(z, mask, own_seeds=True)
    (grad,) = torch.autograd.grad((out * probe).sum(), z)

    G, merged, _, _ = reference(z, sizes, grid, target, tau, tau_g=0.7, gumbel=gumbel)
    (ref_grad,) = torch.autograd.grad((merged * probe).sum(), z)
    torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mask.dense(), G, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)
    # the gradient is straight-through: it differs from the one of the hard mask held fixed
    fixed = merge_mask(z, sizes, grid, target, tau_s=tau, stochastic=False)
    hard_only = torch.autograd.grad((merge(z, fixed, own_seeds=True) * probe).sum(), z)[0]
    assert not torch.allclose(grad, hard_only)


@pytest.mark.parametrize("stochastic", [False, True])
def test_mask_invariants(stochastic):
    torch.manual_seed(2)
    grid, target = (9, 7), (6, 5)
    B, N, D = 4, 63, 16
    z, sizes = torch.randn(B, N, D), torch.randint(1, 5, (B, N)).float()
    mask = merge_mask(z, sizes, grid, target, tau_s=0.2, stochastic=stochastic)
    G = mask.dense()
    _, cand, valid = stencil(grid, target)
    # one target per source, always an allowed one
    assert ((G > 0).sum(-1) == 1).all()
    allowed = torch.zeros(N, 30 + 1, dtype=torch.bool).scatter_(1, cand, valid)[:, :30]
    assert allowed.expand(B, -1, -1)[G > 0].all()
    # columns of G sum to 1 where a source arrived, 0 elsewhere; sizes are conserved
    col = G.sum(1)
    torch.testing.assert_close(col, (mask.count > 0).float())
    torch.testing.assert_close(mask.sizes.sum(-1), sizes.sum(-1))
    assert torch.equal(mask.sizes, torch.einsum("bnm,bn->bm", (G > 0).float(), sizes))
    # merged tokens are size-weighted averages of their sources
    merged = merge(z, mask, own_seeds=True)
    b, m = 1, int(mask.count[1].argmax())
    src = mask.assign[b] == m
    expected = (G[b, src, m, None] * z[b, src]).sum(0)
    torch.testing.assert_close(merged[b, m], expected)


def test_empty_target_falls_back_to_its_seed():
    # force every source into the target to the right of its home (slot 5 = offset (0, +1)) where it exists:
    # the first target column then receives nothing and must equal its seed
    torch.manual_seed(3)
    grid, target = (4, 6), (2, 3)
    B, N, D = 2, 24, 5
    z, sizes = torch.randn(B, N, D), torch.randint(1, 3, (B, N)).float()
    _, _, valid = stencil(grid, target)
    gumbel = torch.zeros(B, N, STENCIL)
    gumbel[:, valid[:, 5], 5] = 1e4  # an overwhelming Gumbel sample
    gumbel[:, ~valid[:, 5], 4] = 1e4  # last column: stay home
    mask = merge_mask(z, sizes, grid, target, stochastic=True, gumbel=gumbel)
    empty = mask.empty
    assert empty[:, 0].all() and empty[:, 3].all() and empty.sum() == 2 * B
    merged = merge(z, mask, own_seeds=True)
    expected = seeds(z, sizes, grid, target)
    torch.testing.assert_close(merged[:, [0, 3]], expected[:, [0, 3]])
    assert (mask.sizes[:, [0, 3]] == 0).all() and torch.equal(mask.sizes.sum(-1), sizes.sum(-1))


def test_eval_mask_is_deterministic_and_batch_independent():
    torch.manual_seed(4)
    z = torch.randn(5, 48, 12)
    a = merge_mask(z, None, (6, 8), (5, 6))
    b = merge_mask(z, None, (6, 8), (5, 6))
    assert torch.equal(a.assign, b.assign) and torch.equal(a.chosen_weight, b.chosen_weight)
    for i in range(5):
        one = merge_mask(z[i:i + 1], None, (6, 8), (5, 6))
        assert torch.equal(one.assign[0], a.assign[i])
        torch.testing.assert_close(merge(z[i:i + 1], one)[0], merge(z, a)[i])


def test_similar_tokens_merge_and_dissimilar_ones_stay_apart():
    # two halves of a 4x4 grid with opposite features: merging to 2x2 never mixes them
    left, right = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([left if (n % 4) < 2 else right for n in range(16)])[None] + 0.01 * torch.randn(1, 16, 2)
    mask = merge_mask(z, None, (4, 4), (2, 2))
    cols = torch.arange(16) % 4
    target_cols = mask.assign[0] % 2
    assert torch.equal(target_cols, (cols >= 2).long())


def test_unmerge_and_compose():
    y = torch.arange(6.0).view(1, 3, 2)
    assign = torch.tensor([[2, 0, 0, 1]])
    assert torch.equal(unmerge(y, assign), y[:, [2, 0, 0, 1]])
    assert torch.equal(compose(torch.tensor([[3, 0, 1, 1, 2]]), assign), torch.tensor([[1, 2, 0, 0, 0]]))


def test_token_merger_knobs_and_errors():
    assert sum(p.numel() for p in TokenMerger(0.5).parameters()) == 0
    learned = TokenMerger(0.5, tau_s=0.2, learn_tau=True)
    assert [p.numel() for p in learned.parameters()] == [1]
    torch.testing.assert_close(learned.tau_s, torch.tensor(0.2))
    learned.tau_s = 0.3
    torch.testing.assert_close(learned.tau_s, torch.tensor(0.3))
    with pytest.raises(ValueError, match="must lie in"):
        TokenMerger(1.5)
    with pytest.raises(ValueError, match="positive"):
        TokenMerger(0.5, tau_g=0)
    with pytest.raises(ValueError, match="affinity"):
        TokenMerger(0.5, affinity="fast")
    with pytest.raises(ValueError, match="no larger than"):
        stencil((4, 4), (5, 4))
    with pytest.raises(ValueError, match="do not fill"):
        merge_mask(torch.randn(1, 10, 3), None, (4, 4), (2, 2))


def test_straight_through_factor_of_a_dominant_non_chosen_slot_is_bounded():
    # 4x4 tokens onto 2x2 targets. Cell 0 holds (nearly) four copies of t, cell 1 the four axes (seed
    # direction t, cosine 0.5 to each member): source 0 matches target 1's seed far better than target
    # 1's own sources (score gap ~17 at tau_s = 0.05), but Gumbel noise keeps every source at home. The
    # exact column-normalisation derivative at that slot is ~e^17 / 4 (the gradient reaches 3e6); ours
    # is e^17 / (4 + e^17) < 1.
    t = torch.full((4,), 0.5)
    z = -t.repeat(1, 16, 1)
    z[0, [0, 1, 4, 5]] = t
    z[0, 0] = t + 0.3 * (torch.eye(4)[0] - torch.eye(4)[1])  # off the seed's axis: a non-zero cosine gradient
    z[0, [2, 3, 6, 7]] = torch.eye(4)
    z.requires_grad_(True)
    gumbel = torch.zeros(1, 16, STENCIL)
    gumbel[..., 4] = 3.0  # home slot: every source stays in its own cell, softly enough to pass gradient
    mask = merge_mask(z, None, (4, 4), (2, 2), tau_s=0.05, stochastic=True, gumbel=gumbel)
    assert torch.equal(mask.assign[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]))
    probe = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((merge(z, mask, own_seeds=True) * probe).sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().max() < 50


def test_gumbel_sampling_survives_zero_exponential_draws(monkeypatch):
    # torch's exponential_ can return exactly 0 in float32; -log(0) = inf noise must not turn the
    # allowed-slot softmax into NaN (which once sent sources to a non-existent target)
    z = torch.randn(2, 36, 8)
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    mask = merge_mask(z, None, (6, 6), (4, 4), stochastic=True)
    assert mask.assign.min() >= 0 and mask.assign.max() < 16
    assert torch.isfinite(mask.slot_weights).all() and torch.isfinite(merge(z, mask)).all()
