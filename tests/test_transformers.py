"""transformers 5 encoders through the host (tokenthrift.hosts.transformers): the null setting of every method is
the model itself for each family and attention implementation; every method on a transformers ViT gives the
logits it gives on the timm ViT whose weights it holds; what a transformers user does (outputs, loss, hidden
states, return_dict, pipeline, save_pretrained, compile) still works. Tiny random configs, no hub."""
import copy
import json

import pytest
import timm
import torch

import tokenthrift as tt
from tokenthrift.errors import InvalidArgumentError, UnsupportedModelError
from tokenthrift.hosts import TransformersHost, find_host, host_of
from tokenthrift.hosts.transformers import vit_from_timm

transformers = pytest.importorskip("transformers")

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
ATTENTIONS = ("eager", "sdpa")


def _build(name: str, attn: str = "sdpa"):
    t = transformers
    torch.manual_seed(0)
    models = {
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**SIZE, num_labels=5, attn_implementation=attn)),
        "vit-base": lambda: t.ViTModel(t.ViTConfig(**SIZE, attn_implementation=attn)),
        "deit-teacher": lambda: t.DeiTForImageClassificationWithTeacher(
            t.DeiTConfig(**SIZE, num_labels=5, attn_implementation=attn)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**{**SIZE, "intermediate_size": None}, mlp_ratio=2,
                                                       layerscale_value=0.5, attn_implementation=attn)),
        "dinov2-registers": lambda: t.Dinov2WithRegistersForImageClassification(t.Dinov2WithRegistersConfig(
            **{**SIZE, "intermediate_size": None}, mlp_ratio=2, num_register_tokens=2, num_labels=5,
            attn_implementation=attn)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SIZE, attn_implementation=attn)),
        "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**SIZE, attn_implementation=attn)),
    }
    return models[name]().eval()


FAMILIES = ("vit", "vit-base", "deit-teacher", "dinov2", "dinov2-registers", "clip", "siglip")
PREFIX = {"vit": 1, "vit-base": 1, "deit-teacher": 2, "dinov2": 1, "dinov2-registers": 3, "clip": 1, "siglip": 0}


def _same(a, b, atol=1e-6):
    """Every tensor field of two transformers outputs agrees."""
    for key, value in a.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(b[key], value, atol=atol, rtol=1e-5, msg=key)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- the host
@pytest.mark.parametrize("name", FAMILIES)
def test_host_describes_each_family(name):
    model = _build(name)
    host = find_host(model)
    assert isinstance(host, TransformersHost)
    assert host.num_prefix_tokens == PREFIX[name] and host.grid_size == (4, 4) and len(host.blocks) == 3
    assert host.has_class_token == (name != "siglip")
    assert len(host.token_norms()) == 2 * 3 + 1 + (name == "clip")  # the final norm; CLIP: its pre-norm too


def test_host_refuses_other_transformers_models():
    t = transformers
    model = t.ConvNextModel(t.ConvNextConfig(num_channels=3, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]))
    assert find_host(model) is None
    with pytest.raises(UnsupportedModelError, match="transformers ViT"):
        tt.tome.apply(model, 2)


# ---------------------------------------------------------------------------------------------- null settings
METHODS = ("ToMe", "ToE", "ReViT", "LTM", "EViT")
LABELS = {"vit": "ViT (`ViTForImageClassification`)", "vit-base": "ViT encoder (`ViTModel`)",
          "deit-teacher": "DeiT, distilled (`DeiTForImageClassificationWithTeacher`)", "dinov2": "DINOv2 (`Dinov2Model`)",
          "dinov2-registers": "DINOv2 + registers (`Dinov2WithRegistersForImageClassification`)",
          "clip": "CLIP vision (`CLIPVisionModel`)", "siglip": "SigLIP vision, MAP head (`SiglipVisionModel`)"}


def _null(method: str, model):
    """The method's null setting on a copy of ``model``: (the model to call, how to undo it)."""
    model = copy.deepcopy(model)
    if method == "ToMe":
        tt.tome.apply(model, 0)
        return model, tt.tome.remove
    if method == "ToE":
        tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10))
        return model, tt.toe.remove
    if method == "EViT":
        tt.evit.apply(model, keep_rate=1.0)
        return model, tt.evit.remove
    if method == "LTM":
        torch.manual_seed(0)
        return tt.ltm.convert(model, 1.0).eval(), tt.ltm.remove
    revit = tt.revit.convert(model, grids=(4,))
    return revit, lambda r: r.vit


def _check_null(name: str, method: str, attn: str, images) -> None:
    model = _build(name, attn)
    with torch.no_grad():
        plain = model(images, output_hidden_states=True)
        patched, undo = _null(method, model)
        if method == "ReViT":  # a wrapper: its logits (an encoder's pooled features)
            reference = plain.logits if "logits" in plain else plain.pooler_output
            torch.testing.assert_close(patched(images), reference, atol=1e-5, rtol=0)
        else:
            out = patched(images, output_hidden_states=True)
            _same(plain, out, atol=1e-5)
            assert [h.shape for h in out.hidden_states] == [h.shape for h in plain.hidden_states]
        restored = undo(patched)
        assert type(restored) is type(model)
        _same(plain, restored(images), atol=1e-5)


def transformers_method_table(images) -> str:
    """docs/encoders.md's table: 'yes' when a method's null setting equals the plain transformers model within 1e-5 with
    eager and with sdpa attention (every output field and the hidden states) and its undo restores it."""
    rows = ["| family (transformers class tested) | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    notes: dict[str, str] = {}
    for name in FAMILIES:
        cells = []
        for method in METHODS:
            try:
                for attn in ATTENTIONS:
                    _check_null(name, method, attn, images)
            except UnsupportedModelError as err:
                reason = str(err).split("; got")[0].split(" (build it")[0]
                cells.append(f"no ({notes.setdefault(reason, 'abcdefghij'[len(notes)])})")
            else:
                cells.append("yes")
        rows.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"({letter}) {reason}." for reason, letter in notes.items()])


def test_the_readme_table_of_transformers_families_is_what_the_methods_do(images):
    from pathlib import Path

    table = transformers_method_table(images)
    readme = (Path(__file__).resolve().parents[1] / "docs" / "encoders.md").read_text()
    start, end = "<!-- transformers families x methods: tests/test_transformers.py -->\n", "\n<!-- end of the table -->"
    assert start in readme, "docs/encoders.md lost the table's markers"
    rest = readme[readme.index(start) + len(start):]
    assert rest[:rest.index(end)] == table, \
        f"docs/encoders.md's table is not what the methods do; it should read:\n{table}"


@pytest.mark.parametrize("name, methods", [("vit", ("ToMe", "ReViT", "LTM")), ("siglip", ("ToMe",))])
def test_null_settings_with_flex_attention(name, methods, images):
    """(ToE's and EViT's null settings run the same host attention as these; flex compiles per shape: a few.)"""
    for method in methods:
        _check_null(name, method, "flex_attention", images)


def test_attention_without_a_float_mask_is_refused_with_the_ones_that_work(images):
    model = _build("vit")
    model.config._attn_implementation = "flash_attention_2"  # flash-attn takes no float mask
    with pytest.raises(UnsupportedModelError, match="eager, sdpa, flex_attention"):
        tt.tome.apply(model, 2)
    tt.tome.apply(model, 2, prop_attn=False)  # without proportional attention, any implementation
    tt.tome.remove(model)

    def no_mask(module, q, k, v, mask, **kwargs):  # an implementation that ignores the mask
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(module, q, k, v, None, **kwargs)

    transformers.AttentionInterface.register("no_mask_test", no_mask)
    model.config._attn_implementation = "sdpa"
    tt.tome.apply(model, 2)
    model.config._attn_implementation = "no_mask_test"  # switched after apply: refused where the bias starts
    with pytest.raises(UnsupportedModelError, match="'no_mask_test' attention cannot take"):
        model(images)


def test_flex_attention_takes_the_size_bias(images):
    eager, flex = _build("vit", "eager"), _build("vit", "flex_attention")
    with torch.no_grad():
        for model in (eager, flex):
            tt.tome.apply(model, 2)
        torch.testing.assert_close(flex(images).logits, eager(images).logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- parity with timm
@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                             mlp_ratio=2, num_classes=5).eval()


def _pair(timm_vit, attn):
    return copy.deepcopy(timm_vit), vit_from_timm(timm_vit, attn).eval()


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 5])
def test_every_method_gives_timms_logits(timm_vit, attn, batch):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        a, b = _pair(timm_vit, attn)
        torch.testing.assert_close(b(x).logits, a(x), atol=1e-5, rtol=1e-5)
        tt.tome.apply(a, 6), tt.tome.apply(b, 6)  # proportional attention on
        torch.testing.assert_close(b(x).logits, a(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(tt.tome.get_handle(b).last_size, tt.tome.get_handle(a).last_size)

        a, b = _pair(timm_vit, attn)
        tt.evit.apply(a, 0.5), tt.evit.apply(b, 0.5)
        torch.testing.assert_close(b(x).logits, a(x), atol=1e-5, rtol=1e-5)

        a, b = _pair(timm_vit, attn)
        torch.manual_seed(3)
        tt.ltm.convert(a, 0.8).eval()
        torch.manual_seed(3)
        tt.ltm.convert(b, 0.8).eval()
        torch.testing.assert_close(b(x).logits, a(x), atol=1e-5, rtol=1e-5)

        a, b = _pair(timm_vit, attn)
        ra, rb = tt.revit.convert(a, (8, 6, 4)), tt.revit.convert(b, (8, 6, 4))
        for bank_a, bank_b in zip(ra.banks(), rb.banks()):  # the grids' norms apart, alike in both
            for k, (pa, pb) in enumerate(zip(bank_a.parameters(), bank_b.parameters())):
                step = torch.randn(pa.shape, generator=torch.Generator().manual_seed(k)) * 0.1
                pa.add_(step), pb.add_(step)
        for grid in (8, 6, 4):
            torch.testing.assert_close(rb(x, grid=grid), ra(x, grid=grid), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rb.vit(x).logits, ra(x), atol=1e-5, rtol=1e-5)  # its own forward: largest grid

    a, b = _pair(timm_vit, attn)
    for model in (a, b):
        tt.toe.apply(model, r0=0.25, keep_rates=(0.5, 1.0), milestones=(0, 10)).set_epoch(0)
        model.train()
    torch.manual_seed(5)
    ya = a(x)
    torch.manual_seed(5)
    yb = b(x).logits  # ToE's training forward: the same kept tokens, the same logits
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    assert torch.equal(tt.toe.get_handle(b).last_patch_index, tt.toe.get_handle(a).last_patch_index)


def test_vit_from_timm_refuses_what_it_cannot_copy():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="avg",
                              class_token=False, num_classes=3)
    with pytest.raises(UnsupportedModelError, match="class token"):
        vit_from_timm(model)


# ---------------------------------------------------------------------------------------------- what users do
def test_outputs_loss_hidden_states_and_tuples(images):
    model = _build("vit")
    tt.tome.apply(model, 3)
    labels = torch.tensor([0, 3, 4])
    out = model(images, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    # the embedding, then every layer's output: 17 tokens, each layer merging 3
    assert [h.shape[1] for h in out.hidden_states] == [17, 14, 11, 8]
    as_tuple = model(images, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.logits)
    base = _build("vit-base")
    tt.tome.apply(base, 3)
    last = base(images).last_hidden_state
    assert last.shape == (3, 8, 32)
    with pytest.raises(UnsupportedModelError, match="attention_mask"):
        model(images, attention_mask=torch.ones(3, 17))


def test_siglip_pools_merged_tokens_by_size(images):
    model = _build("siglip")
    handle = tt.tome.apply(model, 4)
    with torch.no_grad():
        out = model(images)
        size = handle.last_size
        host = host_of(model)
        head = model.head  # the MAP head on the merged tokens repeated by their sizes is the weighted pool
        repeated = torch.stack([x.repeat_interleave(s.view(-1).long(), dim=0) for x, s in
                                zip(out.last_hidden_state, size)])
        torch.testing.assert_close(out.pooler_output, head(repeated), atol=1e-5, rtol=1e-5)
        assert host.pool_type() == "map"


def test_interpolate_pos_encoding_runs_other_sizes():
    model = _build("vit")
    tt.tome.apply(model, 2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True, output_hidden_states=True)
    assert out.hidden_states[0].shape[1] == 37
    with pytest.raises(ValueError, match="doesn't match"):
        model(torch.randn(2, 3, 48, 48))


def test_pipeline_classifies_as_the_model_does():
    model = _build("vit")
    tt.tome.apply(model, 2)
    model.config.id2label = {i: f"class{i}" for i in range(5)}
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
    from PIL import Image

    image = Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy())
    best = classify(image, top_k=1)[0]
    with torch.no_grad():
        logits = model(processor(image, return_tensors="pt").pixel_values).logits
    assert best["label"] == f"class{int(logits.argmax())}"


def test_compile_fullgraph_gives_the_eager_logits(images):
    model = _build("vit")
    tt.tome.apply(model, 3)
    with torch.no_grad():
        expected = model(images).logits
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(images).logits, expected, atol=1e-5, rtol=1e-5)


def test_revit_save_pretrained_round_trip_and_plain_load_refused(tmp_path, images):
    model = _build("vit")
    revit = tt.revit.convert(model, (4, 2))
    with torch.no_grad():
        for p in revit.bank_parameters(1):
            p.add_(0.1)
        tt.revit.save_pretrained(revit, tmp_path)
        loaded = tt.revit.from_pretrained(tmp_path).eval()
        for grid in (4, 2):
            torch.testing.assert_close(loaded(images, grid=grid), revit(images, grid=grid))
    assert not hasattr(model.config, "tokenthrift_revit")  # the user's config is left as it was
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # its report names the stacked norms
        transformers.ViTForImageClassification.from_pretrained(tmp_path)
    plain = tmp_path / "plain"
    _build("vit").save_pretrained(plain)
    with pytest.raises(InvalidArgumentError, match="no tokenthrift ReViT"):
        tt.revit.from_pretrained(plain)


# ---------------------------------------------------------------------------------------------- training
TRAIN_CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=28,
                    patch_size=4, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("method, flags", [("toe", ["--toe-keep-rates", "0.5", "1.0", "--toe-milestones", "0", "1"]),
                                           ("revit", ["--revit-grids", "7", "5"]), ("ltm", ["--ltm-ratio", "0.8", "--no-ltm-ib"])])
def test_train_takes_a_transformers_model(tmp_path, method, flags):
    from tokenthrift.apps.cli import main
    from tokenthrift.train.engine import load_run

    config = tmp_path / "vit.json"
    transformers.ViTConfig(**TRAIN_CONFIG).to_json_file(config)
    main(["train", "--model", f"hf:ViTForImageClassification:{config}", "--data", "fashion-mnist", "--method", method,
          *flags, "--epochs", "2", "--train-subset", "128", "--eval-subset", "64", "--batch-size", "32",
          "--warmup-epochs", "0",
          "--output", str(tmp_path), "--name", "run", "--workers", "0"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 2 and history[1]["train_loss"] < history[0]["train_loss"]  # it learns
    model, cfg, _ = load_run(str(tmp_path / "run" / "last.pth"))
    hf = (model.vit if hasattr(model, "vit") else model).hf
    assert type(hf).__name__ == "ViTForImageClassification" and hf.config.num_labels == 10
    main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--eval-subset", "64"])  # the engine's eval


def test_macs_and_bench_take_a_transformers_model(tmp_path, capsys):
    from tokenthrift.apps.cli import main

    config = tmp_path / "vit.json"
    transformers.ViTConfig(**TRAIN_CONFIG).to_json_file(config)
    model = f"hf:ViTForImageClassification:{config}"
    main(["macs", "--model", model, "--method", "tome", "--tome-r", "4"])
    shown = capsys.readouterr().out
    plain = transformers.ViTForImageClassification(transformers.ViTConfig.from_json_file(config)).eval()
    plain.config.num_labels = 1000
    plain.classifier = torch.nn.Linear(32, 1000)  # macs builds the model with 1000 classes when none are given
    ratio = tt.measure.macs(tt.tome.merging_copy(plain, 4), (1, 28, 28)) / tt.measure.macs(plain, (1, 28, 28))
    assert f"{ratio:.4g}" in next(line for line in shown.splitlines() if "ToMe r=4" in line)
    main(["bench", "--model", model, "--method", "tome", "--tome-r", "4", "--batch-size", "2", "--repeats", "1"])
    assert "ToMe" in capsys.readouterr().out


def test_train_refuses_timm_size_flags_for_a_transformers_model(tmp_path):
    from tokenthrift.train import TrainConfig, build_model

    config = tmp_path / "vit.json"
    transformers.ViTConfig(**TRAIN_CONFIG).to_json_file(config)
    with pytest.raises(InvalidArgumentError, match="config decides its shape"):
        build_model(TrainConfig(model=f"hf:ViTForImageClassification:{config}", data="fashion-mnist", img_size=32))
    with pytest.raises(UnsupportedModelError, match="no model class 'NotAModel'"):
        build_model(TrainConfig(model=f"hf:NotAModel:{config}", data="fashion-mnist"))


def test_a_save_pretrained_folder_trains_from_its_weights(tmp_path, images):
    from tokenthrift.train import TrainConfig, build_model

    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**TRAIN_CONFIG, num_labels=10)).eval()
    hf.save_pretrained(tmp_path / "vit")
    model = build_model(TrainConfig(model=f"hf:{tmp_path / 'vit'}", data="fashion-mnist")).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), hf(x).logits, atol=1e-6, rtol=1e-5)
