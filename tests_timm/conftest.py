"""Run timm's own ``tests/test_models.py`` (fetched from the sdist of the installed timm by ``fetch.py``, never
copied into this repository) against every model tokenthrift registers.

Selection follows timm's: ``ltm_<base>`` runs the tests timm runs for ``<base>`` (same module filters, same
pattern filters, same tags), ``vit_fmnist_tiny_patch2_28`` those of a timm ``vision_transformer``
(``vit_tiny_patch16_224``'s). timm's own models are deselected. What cannot apply is skipped with its reason:

* ``timesformer_*``: video models take clips (B, C, T, H, W); timm's generic tests feed images (B, C, H, W).
  tests/test_video.py covers their intent (forward, backward, cfg, features, intermediates, classifier reset).
* pretrained-weight tests of ``ltm_*``: their (base) weights are on the Hugging Face hub, which this machine
  cannot reach; tests/test_ltm_registered.py loads base weights into LTM models from a local file. The shipped
  ``ltm_vit_fmnist_tiny_patch2_28`` runs them once its packaged weights exist.
* TorchScript tests of ``ltm_*``: LTM models refuse ``torch.jit.script`` with an error that names
  ``torch.compile`` / ``torch.export`` (tests/test_ltm_registered.py checks the refusal).
"""
import fnmatch
import os

import pytest
import timm

import tokenthrift  # noqa: F401  (registers the models)

OURS_PATTERNS = ("ltm_*", "vit_fmnist_tiny_patch2_28", "timesformer_*")
VIT_PROXY = "vit_tiny_patch16_224"  # the timm vision_transformer whose selection the shipped ViT follows
_timm_list_models = timm.list_models


def _ours(name: str) -> bool:
    return any(fnmatch.fnmatch(name.split(".")[0], p) for p in OURS_PATTERNS)


def _counterpart(name: str) -> str | None:
    """The timm model whose selection decides ``name``'s (None: never selected, the video models)."""
    arch, _, tag = name.partition(".")
    if arch.startswith("ltm_") and _ours(arch[4:]):  # ltm_vit_fmnist_tiny_patch2_28: the shipped ViT's selection
        return _counterpart(arch[4:])
    if arch.startswith("ltm_"):
        return arch[4:] + (f".{tag}" if tag else "")
    if arch == "vit_fmnist_tiny_patch2_28":
        return VIT_PROXY
    return None


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """timm.list_models, with tokenthrift's names selected where their counterparts' architectures are."""
    chosen = [n for n in _timm_list_models(filter, module, pretrained, exclude_filters, name_matches_cfg, include_tags)
              if not _ours(n)]
    archs = {n.split(".")[0] for n in chosen}
    ours = [n for n in _timm_list_models(list(OURS_PATTERNS), include_tags=include_tags)
            if _counterpart(n) is not None and _counterpart(n).split(".")[0] in archs]
    return chosen + ours


timm.list_models = list_models


def _model_name(item) -> str | None:
    spec = getattr(item, "callspec", None)
    return spec.params.get("model_name") if spec else None


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        name = _model_name(item)
        (keep if isinstance(name, str) and _ours(name) else drop).append(item)
    for item in keep:
        name = _model_name(item)
        if name.startswith("ltm_") and "torchscript" in item.name:
            item.add_marker(pytest.mark.skip(reason="LTM models refuse TorchScript; torch.compile / torch.export "
                                                    "are the supported paths"))
        file = timm.get_pretrained_cfg(name.split(".")[0]).file
        if item.originalname in ("test_model_load_pretrained", "test_model_features_pretrained"):
            if not file:
                item.add_marker(pytest.mark.skip(reason="the base weights live on the Hugging Face hub, out of reach "
                                                        "offline; tests/test_ltm_registered.py loads them from a file"))
            elif not os.path.exists(file):
                item.add_marker(pytest.mark.skip(reason=f"{file} is not shipped yet (its training run has not "
                                                        "finished); tests/test_ltm_registered.py loads a stand-in"))
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_configure(config):
    for mark in ("base", "cfg", "cfg_nonstd", "features", "forward", "backward", "torchscript", "fxforward",
                 "fxbackward", "timeout"):
        config.addinivalue_line("markers", f"{mark}: timm's test_models marker")
