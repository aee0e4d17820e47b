"""The VLM family table (tokenthrift.vlm.families.FAMILIES) is the only registry of families: every family module's
record is a row of it, tt.vlm.reduce finds a model's family through it alone (a table without a row refuses that
model, naming the table's classes; a row added to it is what a call runs), and the core names no family."""
import ast
import importlib
import inspect
import pkgutil

import pytest
import torch

from tokenthrift import vlm
from tokenthrift.errors import UnsupportedModelError
from tokenthrift.vlm import core, families

transformers = pytest.importorskip("transformers")

IMAGE = 99


@pytest.fixture(scope="module")
def llava():
    t = transformers
    torch.manual_seed(0)
    vision = t.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=16, patch_size=8)
    text = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projector_hidden_act="gelu",
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    return t.LlavaForConditionalGeneration(config).eval()


def _records():
    """Every Family record defined in a module of tokenthrift.vlm: {module name: [records]}."""
    found = {}
    for info in pkgutil.iter_modules(vlm.__path__):
        module = importlib.import_module(f"tokenthrift.vlm.{info.name}")
        records = [v for v in vars(module).values()
                   if isinstance(v, core.Family) and type(v).__module__ == module.__name__]
        if records:
            found[module.__name__] = records
    return found


def test_every_family_module_is_one_record_and_one_row():
    found = _records()
    assert sorted(found) == sorted(type(f).__module__ for f in families.FAMILIES)  # no record outside the table
    for module, records in found.items():  # one record per family file, and it is the row
        assert len(records) == 1 and any(records[0] is f for f in families.FAMILIES), module
    for family in families.FAMILIES:
        assert family.name and family.classes and len(family.model_classes()) == len(family.classes)
        assert set(dict(family.rows)) <= set(family.inputs) and set(family.required) <= set(family.inputs)


def test_the_core_and_the_api_name_no_family():
    """The core, the API and the package's __init__ import no family module and refer to no family's record or
    class by name (only the table does)."""
    modules = {type(f).__module__ for f in families.FAMILIES}
    names = {n for f in families.FAMILIES for n in (*f.classes, type(f).__name__)}
    names |= {name for m in modules for name, v in vars(importlib.import_module(m)).items()
              if any(v is f for f in families.FAMILIES)}  # the records' names (LLAVA, ...)
    for module in (core, vlm.api, vlm):
        tree = ast.parse(inspect.getsource(module))
        imported = {(node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for a in node.names}
        assert not {i for i in imported for m in modules if i.endswith(m.rsplit(".", 1)[1])}, module.__name__
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not used & names, module.__name__


def test_reduce_finds_a_family_only_through_the_table(llava, monkeypatch):
    with pytest.raises(UnsupportedModelError) as refused:
        vlm.reduce(torch.nn.Linear(2, 2), keep=2)
    for family in families.FAMILIES:  # the refusal lists the table's classes
        for name in family.classes:
            assert name in str(refused.value)

    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if f.name != "LLaVA"))
    with pytest.raises(UnsupportedModelError) as refused:  # without its row, LLaVA is an unsupported model
        vlm.reduce(llava, keep=2)
    supported, got = str(refused.value).split("; got ")
    assert got == "LlavaForConditionalGeneration" and "Llava" not in supported
    assert all(name in supported for f in families.FAMILIES for name in f.classes)

    class Renamed(type(families.LLAVA)):
        name = "LLaVA, another row"
        visited = 0

        def visual(self, model, handle, pixel_values, extra):
            Renamed.visited += 1
            return super().visual(model, handle, pixel_values, extra)

    row = Renamed()
    monkeypatch.setattr(families, "FAMILIES", (row, *families.FAMILIES))  # a new row: what the call runs
    handle = vlm.reduce(llava, keep=2, method="divprune")
    try:
        assert handle.family is row
        ids = torch.tensor([[1, *([IMAGE] * 4), 2]])
        with torch.no_grad():
            out = llava(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
        assert Renamed.visited == 1 and out.logits.shape[1] == 1 + 2 + 1
    finally:
        vlm.remove(llava)


def test_a_family_refuses_the_reducers_it_cannot_run_naming_those_it_can():
    class Towerless(core.Family):
        name = "Towerless"
        no_tower = "its tower has none"

    class Picky(Towerless):
        name = "Picky"

        @property
        def reducers(self):
            return ("random", "divprune")

    with pytest.raises(UnsupportedModelError, match="its tower has none: reduce after it with random, pool, "
                                                    "divprune, merge$"):
        core.check_reducer(Towerless(), None, "visionzip")
    core.check_reducer(Towerless(), None, "merge")
    with pytest.raises(UnsupportedModelError, match="Picky does not take the merge reducer; choose one of random, "
                                                    "divprune$"):
        core.check_reducer(Picky(), None, "merge")


def test_the_reduced_class_shows_the_models_own_forward(llava):
    """generate reads the forward's signature (which model arguments it accepts, logits_to_keep, mm_encoder_outputs):
    the reduced class shows its model's, so generation runs as the plain model's does."""
    plain = inspect.signature(llava.forward)
    vlm.reduce(llava, keep=2)
    try:
        assert inspect.signature(llava.forward) == plain
        assert type(llava).__name__ == "ReducedLlavaForConditionalGeneration"
    finally:
        vlm.remove(llava)
    assert type(llava) is transformers.LlavaForConditionalGeneration
