"""Each method owns its inference side (docs/architecture.md): the entry points and the engine never decide
anything by comparing with a method's name, and what they show comes from the adapters' hooks."""
import ast
from pathlib import Path

import pytest
import timm

import tokenthrift
from tokenthrift.errors import InvalidArgumentError
from tokenthrift.train import TrainConfig, Trainer
from tokenthrift.train.methods import METHODS, LTMMethod, Method, TokenExpansion, picture_method, preview_method

SRC = Path(tokenthrift.__file__).parent
NO_DISPATCH = [*sorted((SRC / "apps").glob("*.py")), SRC / "train" / "engine.py", SRC / "train" / "tasks.py"]
NAMES = set(METHODS)


def _names_in(node: ast.AST) -> set[str]:
    """Method names written as string constants in ``node`` (a constant, or a tuple/list/set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}


def test_no_entry_point_compares_with_a_method_name():
    found = []
    for path in NO_DISPATCH:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                named = set().union(*(_names_in(n) for n in (node.left, *node.comparators)))
                if named:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} compares with {sorted(named)}")
    assert not found, "method-name dispatch outside the adapters:\n" + "\n".join(found)


def test_the_check_above_sees_dispatch():
    code = 'if cfg.method == "ltm":\n    pass\nelif kind in ("revit", "x"):\n    pass\n'
    hits = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Compare)
            and set().union(*(_names_in(c) for c in (n.left, *n.comparators)))]
    assert len(hits) == 2


CFG = dict(model="vit_tiny_patch16_224", data="imagefolder:-", num_classes=10,
           model_kwargs={"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2})


def test_preview_method_resolution():
    cfg = TrainConfig(**CFG)
    assert type(preview_method(cfg)) is Method
    assert isinstance(preview_method(cfg, default="toe"), TokenExpansion)
    assert isinstance(preview_method(TrainConfig(**{**CFG, "model": "ltm_vit_small_patch16_224"})), LTMMethod)
    assert isinstance(preview_method(TrainConfig(**CFG, method="toe")), TokenExpansion)  # a ToE recipe
    with pytest.raises(InvalidArgumentError, match="shown on trained checkpoints only"):
        preview_method(cfg, "revit")
    # ToE on an untrained model: stages spread over DeiT's 300 epochs, or the given length
    assert TokenExpansion.preview(cfg).kwargs["milestones"] == (0.0, 100.0, 200.0)
    assert TokenExpansion.preview(cfg, epochs=30).kwargs["milestones"] == (0.0, 10.0, 20.0)
    given = TrainConfig(**CFG, toe_milestones=(0, 4, 8))
    assert TokenExpansion.preview(given).epochs == 12  # the length the milestones imply
    with pytest.raises(InvalidArgumentError, match="--method full has none"):
        Method.preview(cfg, epochs=30)


def test_picture_method_of_trained_runs():
    cfg = TrainConfig(**CFG)
    assert isinstance(picture_method(cfg, Method(cfg)), TokenExpansion)  # a full-token run: ToE's picture
    assert isinstance(picture_method(cfg, Method(cfg), "ltm"), LTMMethod)
    ltm = LTMMethod(TrainConfig(**CFG, method="ltm", ltm_site_ratio=(0.7,)))
    assert picture_method(cfg, ltm) is ltm
    with pytest.raises(InvalidArgumentError, match="drawn as such"):
        picture_method(cfg, ltm, "toe")


def test_variants_drive_eval_rows_and_macs():
    """The default eval rows are the variants'; LTM's variant is the merged model against its plain copy."""
    cfg = TrainConfig(**CFG, method="ltm", ltm_site_ratio=(0.7,))
    method = LTMMethod(cfg)
    base, merged = method.pair(timm.create_model(cfg.model, num_classes=10, **cfg.model_kwargs))
    (variant,) = method.variants(merged, (1, 28, 28))
    assert variant.model is merged and variant.match_tome
    assert variant.columns["MACs_ratio"] == pytest.approx(variant.macs / tokenthrift.measure.macs(base, (1, 28, 28)))
    assert variant.columns["MACs_ratio"] < 1


def test_engine_refuses_a_method_for_a_task_it_does_not_train(tmp_path):
    cfg = TrainConfig(task="detection", model="fasterrcnn", backbone="resnet18", data=f"coco:{tmp_path}",
                      method="toe", output=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="--task detection trains with --method full or ltm; toe does "
                                                   "not apply"):
        Trainer(cfg)
