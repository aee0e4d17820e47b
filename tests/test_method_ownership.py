"""A method is one library module and one adapter (docs/architecture.md): the entry points, the engine and the
configuration never name a method or import a method library, every registered method's flags, help and
refusals come from its adapter, and every method library stays below the engine."""
import ast
import dataclasses
from pathlib import Path

import grimp
import pytest
import timm

import tokenthrift
from tokenthrift.errors import InvalidArgumentError
from tokenthrift.train import TrainConfig, Trainer
from tokenthrift.train.config import METHOD_SPECS, load_recipe, method_flags
from tokenthrift.train.methods import METHODS, LTMMethod, Method, TokenExpansion, picture_method, preview_method

SRC = Path(tokenthrift.__file__).parent
# the method-specific commands (ReViT's assign-labels and adaptive, apps/labels.py) and the scripted demo name
# their methods by design; every other entry point, the engine and the configuration must not
GENERIC = [p for p in sorted((SRC / "apps").glob("*.py")) if p.name not in ("labels.py", "demo.py")]
NO_DISPATCH = [*GENERIC, SRC / "train" / "engine.py", SRC / "train" / "tasks.py", SRC / "train" / "config.py",
               SRC / "train" / "protocol.py"]
NAMES = set(METHODS) - {"full"}


def _library_modules() -> set[str]:
    """The top-level tokenthrift modules the adapters import that are not the engine, data or helpers: the
    method libraries."""
    graph = grimp.build_graph("tokenthrift")
    below = {"tokenthrift.train", "tokenthrift.apps", "tokenthrift.data", "tokenthrift.errors", "tokenthrift.measure",
             "tokenthrift.tokens", "tokenthrift.hosts", "tokenthrift.viz", "tokenthrift.pretrained"}
    found = set()
    for adapter in METHODS.values():
        for imported in graph.find_modules_directly_imported_by(adapter.__module__):
            top = ".".join(imported.split(".")[:2])
            if top.startswith("tokenthrift.") and top not in below:
                found.add(top)
    return found


def test_no_entry_point_or_config_names_a_method():
    found = []
    for path in NO_DISPATCH:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in NAMES:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} names {node.value!r}")
    assert not found, "method names outside the adapters:\n" + "\n".join(found)


def test_the_check_above_sees_names():
    code = 'if cfg.method == "ltm":\n    pass\nflags = ("tome_r", "revit")\n'
    assert sum(isinstance(n, ast.Constant) and n.value in NAMES for n in ast.walk(ast.parse(code))) == 2


def test_no_entry_point_imports_a_method_library():
    graph = grimp.build_graph("tokenthrift")
    libraries = _library_modules()
    assert {"tokenthrift.toe", "tokenthrift.tome", "tokenthrift.revit", "tokenthrift.ltm"} <= libraries
    found = []
    for path in NO_DISPATCH:
        module = ".".join(("tokenthrift", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        found += [f"{module} imports {m}" for m in graph.find_modules_directly_imported_by(module)
                  if ".".join(m.split(".")[:2]) in libraries]
    assert not found, "\n".join(found)


def test_every_method_library_stays_below_the_engine():
    """Whatever library an adapter brings (a new method included, without a line in pyproject.toml), it imports
    nothing of the engine, the data or the entry points."""
    graph = grimp.build_graph("tokenthrift")
    for library in _library_modules():
        for upper in ("tokenthrift.train", "tokenthrift.data", "tokenthrift.apps"):
            chain = graph.find_shortest_chain(importer=library, imported=upper)
            assert chain is None, f"{library} reaches {upper}: {' -> '.join(chain)}"


def test_every_adapter_declares_its_options_with_help():
    for name, adapter in METHODS.items():
        spec = METHOD_SPECS[name]
        assert spec.options is adapter.Options and spec.summary and spec.label
        for f in dataclasses.fields(adapter.Options):
            assert len(f.metadata.get("help", "")) > 5, f"{name}.{f.name} has no help text"
    # the flags a preview takes: only previewable methods' preview options
    assert set(method_flags(preview=True)) <= set(method_flags())
    assert "revit_grids" not in method_flags(preview=True) and "tome_r" in method_flags(preview=True)


def test_flat_keys_route_to_the_chosen_methods_options():
    cfg = TrainConfig(method="ltm", ltm_site_ratio=0.7, ltm_ib=False)
    assert cfg.options.site_ratio == (0.7,) and cfg.options.ib is False
    assert TrainConfig(**cfg.to_dict()).options == cfg.options  # to_dict is flat, as recipes are
    assert cfg.to_dict()["ltm_site_ratio"] == (0.7,) and "tome_r" not in cfg.to_dict()
    with pytest.raises(InvalidArgumentError, match="--tome-r applies to --method tome, but this run is --method ltm"):
        TrainConfig(method="ltm", tome_r=4)
    with pytest.raises(InvalidArgumentError, match="unknown config keys"):
        TrainConfig(method="ltm", ltm_nonsense=1)
    # a config saved when every method's fields were written: the other methods' dropped
    saved = {**TrainConfig().to_dict(), "toe_r0": 0.25, "tome_r": 8, "ltm_ratio": None}
    assert type(TrainConfig.from_saved(saved).options).__name__ == "NoOptions"
    with pytest.warns(UserWarning, match="--ltm-ratio is now --ltm-site-ratio"):
        assert TrainConfig(method="ltm", ltm_ratio=0.5).options.site_ratio == (0.5,)
    assert cfg.with_method("tome", r=3).options.r == 3


@pytest.mark.parametrize("recipe", ["fmnist_vit_tiny", "fmnist_vit_tiny_toe", "fmnist_vit_tiny_ltm", "fmnist_swin_tiny_ltm"])
def test_shipped_recipes_load_unchanged(recipe):
    values = load_recipe(recipe)
    cfg = TrainConfig(**values)
    for key, value in values.items():  # every recipe key lands where it did, as written
        got = cfg.to_dict()[key]
        assert got == (tuple(value) if isinstance(value, list) and isinstance(got, tuple) else value), key


CFG = dict(model="vit_tiny_patch16_224", data="imagefolder:-", num_classes=10,
           model_kwargs={"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2})


def test_preview_method_resolution():
    cfg = TrainConfig(**CFG)
    assert type(preview_method(cfg)) is Method
    assert isinstance(preview_method(cfg, default="toe"), TokenExpansion)
    ltm_model = timm.create_model("ltm_vit_small_patch16_224", num_classes=10)
    assert isinstance(preview_method(TrainConfig(**{**CFG, "model": "ltm_vit_small_patch16_224"}), ltm_model),
                      LTMMethod)  # the adapter that claims the model
    assert isinstance(preview_method(TrainConfig(**CFG, method="toe")), TokenExpansion)  # a ToE recipe
    with pytest.raises(InvalidArgumentError, match="shown on trained checkpoints only"):
        preview_method(cfg, requested="revit")
    # ToE on an untrained model: stages spread over DeiT's 300 epochs, or the given length
    toe_cfg = cfg.with_method("toe")
    assert TokenExpansion.preview(toe_cfg).kwargs["milestones"] == (0.0, 100.0, 200.0)
    assert TokenExpansion.preview(toe_cfg, epochs=30).kwargs["milestones"] == (0.0, 10.0, 20.0)
    given = TrainConfig(**CFG, method="toe", toe_milestones=(0, 4, 8))
    assert TokenExpansion.preview(given).epochs == 12  # the length the milestones imply
    with pytest.raises(InvalidArgumentError, match="--method full has none"):
        Method.preview(cfg, epochs=30)


def test_picture_method_of_trained_runs():
    cfg = TrainConfig(**CFG)
    assert isinstance(picture_method(cfg, Method(cfg)), TokenExpansion)  # a full-token run: ToE's picture
    assert isinstance(picture_method(cfg.with_method("ltm", site_ratio=0.7), Method(cfg), "ltm"), LTMMethod)
    ltm = LTMMethod(TrainConfig(**CFG, method="ltm", ltm_site_ratio=(0.7,)))
    assert picture_method(cfg, ltm) is ltm
    with pytest.raises(InvalidArgumentError, match="drawn as such"):
        picture_method(cfg, ltm, "toe")


def test_variants_drive_eval_rows_and_macs():
    """LTM's variant is the merged model against its plain copy: the entry points' rows come from it."""
    from tokenthrift.apps.variants import evaluation_rows, macs_rows
    from tokenthrift.train.protocol import EvalContext

    cfg = TrainConfig(**CFG, method="ltm", ltm_site_ratio=(0.7,))
    method = LTMMethod(cfg)
    base, merged = method.pair(timm.create_model(cfg.model, num_classes=10, **cfg.model_kwargs))
    (variant,) = method.variants(merged, (1, 28, 28))
    assert variant.model is merged and variant.match and variant.baseline is not None
    plain_macs = tokenthrift.measure.macs(base, (1, 28, 28))
    plain_row, row = macs_rows([variant], (1, 28, 28))  # the baseline gets its row
    assert plain_row["model"] == "without the method" and plain_row["GMACs"] == pytest.approx(plain_macs / 1e9)
    assert row["MACs_ratio"] == pytest.approx(variant.macs / plain_macs) and row["MACs_ratio"] < 1
    ctx = EvalContext(top1=lambda model, **kw: 50.0, loader=[], device="cpu")
    ctx.__class__ = type("Ctx", (EvalContext,), {"images": property(lambda self: 7)})
    (row,) = evaluation_rows([variant], (1, 28, 28), ctx)
    assert row["top1"] == 50.0 and row["baseline_GMACs"] == pytest.approx(plain_macs / 1e9)


def test_engine_refuses_a_method_for_a_task_it_does_not_train(tmp_path):
    cfg = TrainConfig(task="detection", model="fasterrcnn", backbone="resnet18", data=f"coco:{tmp_path}",
                      method="toe", output=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="--task detection trains with --method full or ltm; toe does "
                                                   "not apply"):
        Trainer(cfg)
