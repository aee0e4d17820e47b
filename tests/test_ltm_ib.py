"""LTM's IB loss and torch k-means: against direct computations, determinism, and a two-process gather."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tokenthrift.ltm.ib import IBLoss, kmeans, nearest_centroid


def blobs(n_per=60, k=4, d=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=-1) * 3
    x = torch.cat([c + spread * torch.randn(n_per, d, generator=g) for c in centers])
    labels = torch.arange(k).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], labels[perm], centers


def lloyd_reference(x, init, iters):
    """Plain Lloyd iterations, one point at a time."""
    c = init.clone().double()
    x = x.double()
    for _ in range(iters):
        assign = [int(min(range(len(c)), key=lambda a: float(((p - c[a]) ** 2).sum()))) for p in x]
        c = torch.stack([x[[i for i, a in enumerate(assign) if a == j]].mean(0) for j in range(len(c))])
    return c


def test_kmeans_finds_separable_clusters_and_matches_lloyd():
    x, labels, _ = blobs()
    c = kmeans(x, 4, iters=30, seed=0)
    assign, _ = nearest_centroid(x, c)
    # every found cluster is exactly one true cluster
    pairs = {(int(a), int(b)) for a, b in zip(assign, labels)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    for a, b in pairs:
        torch.testing.assert_close(c[a], x[labels == b].mean(0), rtol=1e-5, atol=1e-5)
    # the same iterations as a plain reference from the same initial centroids
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:5]]
    ours = kmeans(x, 5, iters=3, seed=7, tol=-1.0)
    torch.testing.assert_close(ours.double(), lloyd_reference(x, init, 3), rtol=1e-5, atol=1e-5)


def test_kmeans_is_deterministic_given_the_seed_and_chunking():
    x, _, _ = blobs(n_per=50, k=6, spread=0.5)
    a = kmeans(x, 6, seed=3)
    assert torch.equal(a, kmeans(x, 6, seed=3))
    torch.testing.assert_close(a, kmeans(x, 6, seed=3, chunk=7))
    assert not torch.equal(a, kmeans(x, 6, seed=4))


def test_kmeans_keeps_k_clusters_when_one_empties():
    # two far points and many duplicates: a duplicate-initialised centroid loses all its points
    x = torch.cat([torch.zeros(20, 2), torch.tensor([[10.0, 0.0], [0.0, 10.0]])])
    c = kmeans(x, 3, iters=10, seed=0)
    assert c.shape == (3, 2)
    assign, _ = nearest_centroid(x, c)
    assert len(assign.unique()) == 3
    with pytest.raises(ValueError, match="1 <= k"):
        kmeans(x, 30)


def test_ib_loss_against_a_direct_computation():
    torch.manual_seed(0)
    feats, labels = torch.randn(200, 6), torch.randint(0, 3, (200,))
    ib = IBLoss(num_classes=3, num_clusters=1000, beta=10.0, eps=1e-6, seed=1)
    ib.fit(feats, labels)
    assert ib.centroids.shape == (20, 6)  # K capped at num_samples / 10
    c = ib.centroids.double()
    fn = F.normalize(feats.double(), dim=-1)
    phi = torch.stack([torch.softmax(-10.0 * ((f - c) ** 2).sum(-1), 0) for f in fn])  # one sample at a time
    q = torch.stack([phi[labels == y].mean(0) for y in range(3)], dim=1)  # Q[a, y]
    torch.testing.assert_close(ib.q.double(), q, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ib.q.sum(0), torch.ones(3))
    batch, y = torch.randn(8, 6, requires_grad=True), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = ib(batch, y)
    pb = torch.stack([torch.softmax(-10.0 * ((f - c) ** 2).sum(-1), 0)
                      for f in F.normalize(batch.detach().double(), dim=-1)])
    direct = -torch.stack([(pb[i] * (q[:, y[i]] + 1e-6).log()).sum() for i in range(8)]).mean()
    torch.testing.assert_close(loss.double(), direct, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert batch.grad.abs().sum() > 0
    # soft targets: one-hot soft targets give the same loss; a mixture mixes the log Q columns
    torch.testing.assert_close(ib(batch, F.one_hot(y, 3).float()), loss)
    mix = 0.7 * F.one_hot(y, 3).float() + 0.3 * F.one_hot(y.roll(1), 3).float()
    direct_mix = -torch.stack([(pb[i] * (0.7 * (q[:, y[i]] + 1e-6).log() + 0.3 * (q[:, y.roll(1)[i]] + 1e-6).log())
                                ).sum() for i in range(8)]).mean()
    torch.testing.assert_close(ib(batch, mix).double(), direct_mix, rtol=1e-4, atol=1e-6)


def test_ib_rewards_class_consistent_clusters():
    x, labels, _ = blobs(n_per=40, k=4)
    ib = IBLoss(num_classes=4, num_clusters=4, seed=0)
    ib.fit(x, labels)
    right = ib(x[:16], labels[:16])
    wrong = ib(x[:16], (labels[:16] + 1) % 4)
    assert 10 * right < wrong


def test_ib_errors_and_state():
    ib = IBLoss(num_classes=3)
    with pytest.raises(RuntimeError, match="fit"):
        ib(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must lie"):
        ib.fit(torch.randn(20, 4), torch.full((20,), 5))
    with pytest.raises(ValueError, match="positive"):
        IBLoss(num_classes=0)
    ib.fit(torch.randn(30, 4), torch.randint(0, 3, (30,)))
    other = IBLoss(num_classes=3)
    other.load_state_dict(ib.state_dict())
    assert torch.equal(other.centroids, ib.centroids) and torch.equal(other.q, ib.q)


def _ddp_fit(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, labels, _ = blobs(n_per=30, k=3, spread=0.3, seed=5)
    half = len(x) // world
    ib = IBLoss(num_classes=3, num_clusters=5, seed=rank)  # different seeds: rank 0's must win
    part = slice(rank * half, (rank + 1) * half)
    ib.fit(x[part], labels[part], seed=11 if rank == 0 else 99)
    torch.save({"centroids": ib.centroids, "q": ib.q}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_fit_under_ddp_gathers_features_and_broadcasts_rank0(tmp_path):
    mp.spawn(_ddp_fit, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert torch.equal(r0["centroids"], r1["centroids"]) and torch.equal(r0["q"], r1["q"])
    x, labels, _ = blobs(n_per=30, k=3, spread=0.3, seed=5)
    single = IBLoss(num_classes=3, num_clusters=5)
    single.fit(x, labels, seed=11)
    torch.testing.assert_close(r0["centroids"], single.centroids)
    torch.testing.assert_close(r0["q"], single.q)
