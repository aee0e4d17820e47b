"""LTMMethod: engine hooks, IB schedule, temperature annealing, checkpoints, and a tiny training run."""
import copy

import pytest
import timm
import torch
from torch import nn

from tokenthrift import ltm
from tokenthrift.train import TrainConfig
from tokenthrift.train.methods import LTMMethod
from tokenthrift.train.methods.ltm import ratio_of


def cfg(**kw):
    base = dict(model="vit_tiny_patch16_224", method="ltm", epochs=10, seed=0, ltm_site_ratio=0.8, ltm_ib_start=0.3,
                ltm_clusters=1000)
    return TrainConfig(**{**base, **kw})


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=4)


def step(method, model, n=40):
    x, y = torch.randn(n, 3, 32, 32), torch.arange(n) % 4
    loss = method.loss(model, x, y, nn.CrossEntropyLoss())
    loss.backward()
    return loss


def test_ratio_of():
    assert ratio_of(None) is None and ratio_of((0.8,)) == 0.8 and ratio_of((0.9, 0.8)) == [0.9, 0.8]


def test_attach_converts_once_and_keeps_ltm_models():
    method = LTMMethod(cfg())
    model = method.attach(tiny_vit())
    assert ltm.is_ltm(model) and {m.ratio for m in ltm.mergers(model)} == {0.8}
    registered = timm.create_model("ltm_vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                   num_classes=4)
    kept = LTMMethod(cfg(model="ltm_vit_small_patch16_224", ltm_site_ratio=None, ltm_tau=0.5)).attach(registered)
    assert kept is registered and {m.tau_g for m in ltm.mergers(kept)} == {0.5}
    with pytest.raises(ValueError, match="already an LTM model"):
        LTMMethod(cfg(model="ltm_vit_small_patch16_224")).attach(copy.deepcopy(registered))
    with pytest.raises(ValueError, match="no calibrated LTM ratio"):
        LTMMethod(cfg(ltm_site_ratio=None)).attach(tiny_vit())


@pytest.mark.parametrize("kw,message", [
    (dict(ltm_tau=0.0), "positive"), (dict(ltm_ib_start=1.5), "share of the epochs"),
    (dict(ltm_kmeans_every=0), "positive"),
])
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        LTMMethod(cfg(**kw))


def test_a_bad_ratio_is_refused_once_at_the_library_boundary_and_leaves_the_model_plain():
    model = tiny_vit()
    with pytest.raises(ValueError, match="LTM ratio 1.2 must lie in"):
        LTMMethod(cfg(ltm_site_ratio=1.2)).attach(model)
    assert not ltm.is_ltm(model)


def test_ib_schedule_collects_the_epoch_before_each_refresh():
    # 10 epochs, IB from epoch 3, refresh every 2 epochs: collect in epochs 2, 4, 6, 8; fit at 3, 5, 7, 9
    method = LTMMethod(cfg(ltm_kmeans_every=2))
    model = method.attach(tiny_vit()).train()
    fitted, active, collected = [], [], []
    for epoch in range(10):
        before = None if method.ib.centroids is None else method.ib.centroids.clone()
        method.on_epoch_start(epoch)
        refreshed = method.ib.fitted and (before is None or not torch.equal(before, method.ib.centroids))
        fitted.append(refreshed)
        step(method, model)
        log = method.log()  # the engine logs after the epoch's steps
        active.append(log["ltm_ib_active"])
        assert ("ltm_ib" in log) == log["ltm_ib_active"] and log.get("ltm_ib_refreshed", False) == refreshed
        collected.append(len(method._features))
    assert [e for e, f in enumerate(fitted) if f] == [3, 5, 7, 9]
    assert active == [False] * 3 + [True] * 7
    assert [e for e, c in enumerate(collected) if c] == [2, 4, 6, 8]
    assert method.ib.centroids.shape[0] == 4  # 40 collected samples // 10


def test_loss_adds_the_weighted_ib_term_once_active():
    method = LTMMethod(cfg(epochs=2, ltm_ib_start=0.5, ltm_ib_weight=0.25))
    model = method.attach(tiny_vit()).train()
    method.on_epoch_start(0)
    step(method, model)
    method.on_epoch_start(1)  # clusters fitted from epoch 0's features
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    torch.manual_seed(1)
    total = method.loss(model, x, y, nn.CrossEntropyLoss())
    torch.manual_seed(1)
    logits = model(x)
    feats = method.capture.take()
    expected = nn.CrossEntropyLoss()(logits, y) + 0.25 * method.ib(feats, y)
    torch.testing.assert_close(total, expected)
    # the captured pooled features are the classifier's input
    torch.testing.assert_close(model.get_classifier()(feats), logits)
    # soft targets (mixup) work too
    soft = torch.softmax(torch.randn(8, 4), -1)
    assert torch.isfinite(method.loss(model, x, soft, lambda o, t: -(t * o.log_softmax(-1)).sum(-1).mean()))
    # eval forwards and deep copies (EMA, MACs counting) do not capture
    model.eval()
    model(x)
    assert method.capture.value is None
    clone = copy.deepcopy(model)
    assert ltm.is_ltm(clone)


def test_tau_annealing_and_checkpoint_state():
    method = LTMMethod(cfg(epochs=4, ltm_tau=1.0, ltm_tau_final=0.25, ltm_ib_start=0.25))
    model = method.attach(tiny_vit()).train()
    taus = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        taus.append(method.current_tau)
        method.on_step(epoch + 0.5)
        assert [m.tau_g for m in ltm.mergers(model)] == pytest.approx([0.25 ** ((epoch + 0.5) / 4)] * 2)
        step(method, model)
    assert taus == pytest.approx([1.0, 0.25 ** 0.25, 0.25 ** 0.5, 0.25 ** 0.75])
    state = method.state_dict()
    fresh = LTMMethod(cfg(epochs=4, ltm_ib_start=0.25))
    fresh.attach(tiny_vit())
    fresh.load_state_dict(copy.deepcopy(state))
    assert torch.equal(fresh.ib.centroids, method.ib.centroids) and fresh.epoch == 3


def test_ib_off():
    method = LTMMethod(cfg(ltm_ib=False, ltm_ib_start=0.0))
    model = method.attach(tiny_vit()).train()
    method.on_epoch_start(0)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    torch.manual_seed(0)
    loss = method.loss(model, x, y, nn.CrossEntropyLoss())
    torch.manual_seed(0)
    torch.testing.assert_close(loss, nn.CrossEntropyLoss()(model(x), y))
    assert method.ib is None and not method.log()["ltm_ib_active"]


def test_trains_in_the_engine(tmp_path):
    from tokenthrift.train import TrainConfig, Trainer

    config = TrainConfig(model="vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3,
                         num_heads=2, data="fashion-mnist", train_subset=256, eval_subset=100, batch_size=64,
                         eval_batch_size=100, epochs=2, warmup_epochs=0, progress=False, threads=1, mixup=0.2,
                         ema=True, output=str(tmp_path), name="ltm", method="ltm", ltm_site_ratio=0.8, ltm_ib_start=0.5,
                         ltm_tau_final=0.5)
    trainer = Trainer(config, method=LTMMethod(config))
    summary = trainer.fit()
    first, second = summary["history"]
    assert not first["ltm_ib_active"] and second["ltm_ib_active"] and second["ltm_clusters"] == 25
    assert second["ltm_tau"] < first["ltm_tau"] < 1.0 and "ltm_ib" in second and "ltm_ib" not in first
    from tokenthrift import measure
    plain = ltm.remove(copy.deepcopy(trainer.model))
    assert summary["inference_macs"] < 0.95 * measure.macs(plain, (1, 28, 28))  # the engine counts the merged model
    assert ltm.is_ltm(trainer.model) and ltm.is_ltm(trainer.ema.module)
    ckpt = torch.load(tmp_path / "ltm" / "last.pth", weights_only=False)
    assert ckpt["method"]["name"] == "ltm" and ckpt["method"]["ib"]["centroids"].shape[0] == 25


def macs_ratio(model, size):
    from tokenthrift import measure
    return measure.macs(model, size) / measure.macs(ltm.plain_copy(model), size)


def test_a_cost_asked_as_macs_is_the_cost_measured():
    """--ltm-ratio 0.85 gave 0.67 of the MACs on the shipped ViT (a per-site ratio compounds over the blocks):
    --ltm-macs is the cost, calibrated per site as the registered models are; the per-site knob is named so."""
    shipped = timm.create_model("vit_fmnist_tiny_patch2_28")
    per_site = ltm.convert(copy.deepcopy(shipped), site_ratio=0.85)
    assert macs_ratio(per_site, (1, 28, 28)) == pytest.approx(0.67, abs=0.02)  # the number
    for target in (0.85, 0.6):
        asked = ltm.convert(copy.deepcopy(shipped), macs=target)
        assert macs_ratio(asked, (1, 28, 28)) == pytest.approx(target, abs=0.01)
    deit = timm.create_model("deit_small_patch16_224", img_size=112)  # DeiT-S shapes at 7x7: counted fast
    assert macs_ratio(ltm.convert(copy.deepcopy(deit), macs=0.86), (3, 112, 112)) == pytest.approx(0.86, abs=0.01)
    with pytest.warns(DeprecationWarning, match="now site_ratio"):
        old = ltm.convert(copy.deepcopy(shipped), ratio=0.85)
    assert [m.ratio for m in ltm.mergers(old)] == [m.ratio for m in ltm.mergers(per_site)]
    with pytest.raises(ValueError, match="not both"):
        ltm.convert(copy.deepcopy(shipped), site_ratio=0.9, macs=0.8)
    with pytest.warns(UserWarning, match="closest this model reaches"):  # below the 4-token floor: said, not hidden
        ltm.convert(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), macs=0.2)
    registered = timm.create_model("ltm_vit_fmnist_tiny_patch2_28", ltm_macs=0.7)
    assert macs_ratio(registered, (1, 28, 28)) == pytest.approx(0.7, abs=0.01)


def test_the_method_calibrates_ltm_macs_and_a_checkpoint_keeps_its_ratios(tmp_path):
    from tokenthrift.train import train
    from tokenthrift.train.engine import load_run

    run = dict(model="vit_fmnist_tiny_patch2_28", data="fashion-mnist", train_subset=64, eval_subset=64, epochs=1,
               batch_size=32, progress=False, threads=2, output=str(tmp_path), name="m", method="ltm",
               ltm_macs=0.8, ltm_site_ratio=None, ltm_ib=False)
    summary = train(TrainConfig(**{**cfg().to_dict(), **run}))
    assert summary["inference_macs"] / summary["baseline_macs"] == pytest.approx(0.8, abs=0.012)
    model, restored, method = load_run(tmp_path / "m" / "last.pth")
    assert method.macs is None and method.site_ratios == [m.ratio for m in ltm.mergers(model)]
    assert macs_ratio(model, (1, 28, 28)) == pytest.approx(0.8, abs=0.01)
    with pytest.raises(ValueError, match="--ltm-macs .* and --ltm-site-ratio .* both"):
        cfg(ltm_macs=0.8)
    with pytest.raises(ValueError, match="--ltm-macs 1.5"):
        cfg(ltm_macs=1.5, ltm_site_ratio=None)


def test_the_former_ltm_ratio_name_still_loads_and_warns(tmp_path):
    from tokenthrift.apps.cli import build_parser
    from tokenthrift.train import load_recipe
    from tokenthrift.train.config import config_from_args

    old = tmp_path / "old.yaml"
    old.write_text("method: ltm\nltm_ratio: [0.9, 0.8]\n")  # a recipe written before the rename
    with pytest.warns(UserWarning, match="--ltm-ratio is now --ltm-site-ratio"):
        assert TrainConfig(**load_recipe(str(old))).options.site_ratio == (0.9, 0.8)
    with pytest.warns(UserWarning, match="--ltm-ratio is now --ltm-site-ratio .*--ltm-macs"):
        args = build_parser().parse_args(["train", "--method", "ltm", "--ltm-ratio", "0.7"])
    assert config_from_args(args).options.site_ratio == (0.7,)
