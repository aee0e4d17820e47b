"""MACs counter against analytic values, its guard against uncounted kernels, throughput side effects."""
import pytest
import timm
import torch

from tokenthrift import measure
from tokenthrift.errors import InvalidArgumentError


@pytest.mark.parametrize("name,gmacs", [("deit_tiny_patch16_224", 1.25), ("deit_small_patch16_224", 4.60),
                                        ("vit_base_patch16_224", 17.56)])
def test_pinned_vit_macs_with_fused_attention(name, gmacs):
    model = timm.create_model(name, pretrained=False)
    assert model.blocks[0].attn.fused_attn  # timm's default fused kernel, the one that was miscounted
    assert measure.macs(model, (3, 224, 224)) / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert measure.macs(model, (3, 224, 224)) == pytest.approx(measure.vit_macs(model), rel=1e-9)


def test_the_package_keeps_every_name_of_the_one_module_measure():
    """measure was one module; every name it defined (private ones included) is still reachable from the package,
    each defined in the module of its concept."""
    homes = {"counting": ["macs", "vit_macs", "UncountedOpError", "_EXTRA_FLOPS", "_HEAVY", "_OpRecorder",
                          "_sdpa_forward", "_sdpa_backward", "_cdist"],
             "timing": ["throughput", "throughput_samples", "paired_throughput", "FixedForward", "OnImages",
                        "run_metadata", "_sync", "_timed"],
             "oracle": ["block_token_counts", "TokenCutOracle", "merge_agreement"],
             "state": ["training_mode", "device_of", "model_input_shape", "_frozen", "frozen", "module_modes",
                       "restore_modes"],
             "rows": ["merging_speed_rows", "detector_macs_rows"]}
    for module, names in homes.items():
        for name in names:
            assert getattr(measure, name) is getattr(getattr(measure, module), name), name
    assert sorted(measure.__all__) == sorted(n for names in homes.values() for n in names if not n.startswith("_"))
    assert measure._EXTRA_FLOPS is measure.counting._EXTRA_FLOPS  # a formula added through the package counts


def test_missing_attention_formula_is_an_error_not_a_low_count(monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    extra = dict(measure._EXTRA_FLOPS)
    extra.pop(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    monkeypatch.setattr(measure.counting, "_EXTRA_FLOPS", extra)  # the counter reads its own module's dict
    with pytest.raises(measure.UncountedOpError, match="flash_attention_for_cpu"):
        measure.macs(model, (3, 32, 32))


def test_macs_counts_convs_and_reports_per_image():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))
    expected = 16 * 8 * 3 * 9 + 8 * 16 * 5
    assert measure.macs(model, (3, 4, 4)) == expected
    assert measure.macs(model, (3, 4, 4), batch_size=4) == expected
    with pytest.raises(ValueError, match="channels, height, width"):
        measure.macs(model, (4, 4))


def test_training_mode_count_has_no_side_effects():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    bn = model.bn1 if hasattr(model, "bn1") else next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.eval()
    torch.manual_seed(123)
    measure.macs(model, (3, 32, 32), train=True)
    after_rng = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_rng)  # the caller's random stream did not move
    assert torch.equal(bn.running_mean, before) and not model.training


def test_throughput_leaves_weights_untouched_and_is_positive():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = measure.throughput_samples(model, (3, 32, 32), batch_size=4, train=True, warmup=1, repeats=3)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert measure.throughput(model, (3, 32, 32), batch_size=4, warmup=1, repeats=3) > 0


def test_paired_throughput_rotates_the_order_and_warms_each_model_before_timing_it():
    """At batch 1 the first call after another model runs cold, so no model may always follow the same one: round
    r starts at model r, and every timed call follows an untimed call of the same model."""
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag, self.w = tag, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(self.tag)
            return x

    speeds = measure.paired_throughput([Probe(0), Probe(1), Probe(2)], (1,), 1, warmup=2, repeats=4)
    assert len(speeds) == 3 and all(s > 0 for s in speeds)
    first = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # round 0: two warm-up calls, then the timed one
    later = [m for r in (1, 2, 3) for k in range(3) for m in 2 * [(r + k) % 3]]  # one untimed call, one timed
    assert calls == first + later


def test_vit_macs_rejects_wrong_token_list():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    with pytest.raises(ValueError, match="2 blocks"):
        measure.vit_macs(model, [17])


def test_toe_schedule_mean_matches_spec_for_deit_small():
    # docs/methods.md §2: the default DeiT-S schedule averages 3.52 GMACs over training against 4.60
    from tokenthrift.train import TrainConfig
    from tokenthrift.train.methods import TokenExpansion

    from tokenthrift.apps.variants import macs_rows

    cfg = TrainConfig(model="deit_small_patch16_224", data="imagefolder:-", method="toe")
    toe = TokenExpansion.preview(cfg)  # stages spread over DeiT's 300 epochs
    size = (3, 224, 224)
    rows = macs_rows(toe.training_variants(timm.create_model("deit_small_patch16_224", pretrained=False), size), size)
    assert rows[-1]["GMACs"] == pytest.approx(3.52, abs=0.01)
    assert [r["keep_rate"] for r in rows[1:3]] == [0.5, 0.75]


def _flop_counter_macs(model, x, train):
    """Reference count: FlopCounterMode alone, on the math attention kernel (plain matmuls it knows), with
    gradients recorded as in a training step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    model.train(train)
    with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(train), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("train", [False, True])
def test_ltm_training_macs_count_the_straight_through_product(train):
    """A training forward of an LTM model runs the dense straight-through G^T Z product (autograd on); the
    counter must see what that forward executes, not the no-grad scatter path."""
    import tokenthrift as tt

    model = tt.ltm.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=2,
                                             in_chans=1, embed_dim=48, depth=3, num_heads=3, num_classes=10), 0.8)
    x = torch.randn(2, 1, 28, 28)
    expected = _flop_counter_macs(model, x, train)
    assert measure.macs(model, (1, 28, 28), train=train, batch_size=2) == pytest.approx(expected, rel=1e-9)
    if train:  # the dense product is really there: more than the inference count
        assert expected > measure.macs(model, (1, 28, 28))


def slow_adjusted_rand_index(x: list[int], y: list[int]) -> float:
    """The adjusted Rand index from its definition (Hubert & Arabie 1985): the contingency table counted in
    Python, pairs within cells against the value expected under random labelling with the same group sizes."""
    from math import comb

    table, rows, cols = {}, {}, {}
    for u, v in zip(x, y):
        table[u, v] = table.get((u, v), 0) + 1
        rows[u], cols[v] = rows.get(u, 0) + 1, cols.get(v, 0) + 1
    index = sum(comb(c, 2) for c in table.values())
    a, b = sum(comb(c, 2) for c in rows.values()), sum(comb(c, 2) for c in cols.values())
    expected, top = a * b / comb(len(x), 2), (a + b) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def test_merge_agreement_is_the_mean_pairwise_adjusted_rand_index():
    import itertools

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (7, 50), generator=g)
    ids[1] = 40 - 3 * ids[0]  # image 0's partition under other labels
    ids[2, :25] = 0  # a lopsided one
    pairs = list(itertools.combinations(range(7), 2))
    expected = sum(slow_adjusted_rand_index(ids[i].tolist(), ids[j].tolist()) for i, j in pairs) / len(pairs)
    assert measure.merge_agreement(ids) == pytest.approx(expected, abs=1e-12)
    assert slow_adjusted_rand_index(ids[0].tolist(), ids[1].tolist()) == 1.0
    assert measure.merge_agreement(torch.arange(12).repeat(5, 1)) == 1.0  # a fixed merge (here: none) for every image
    assert measure.merge_agreement(torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2]])) == pytest.approx(4 / 7)
    shuffled = torch.stack([torch.randperm(60, generator=g) // 4 for _ in range(40)])
    assert abs(measure.merge_agreement(shuffled)) < 0.02  # random partitions of the same sizes: about 0
    with pytest.raises(InvalidArgumentError, match="at least 2 images"):
        measure.merge_agreement(ids[:1])
