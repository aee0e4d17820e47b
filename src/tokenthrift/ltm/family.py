"""One record per model family: what LTM patches in it and how. :mod:`tokenthrift.ltm.conversion` reads the
table of these records for ``convert``, ``remove``, ``merge_sites`` and ``merge_maps``; a new family is one
file with its LTM block class and its :class:`Family` record, plus one row in that table.

Every family is patched the same way: each of its blocks is class-swapped to the family's LTM subclass of
the timm block (same modules, same parameters and state_dict keys) and given its merge site(s) as a
parameter-free ``ltm`` attribute (:class:`~tokenthrift.ltm.mask.TokenMerger`, or a ``ModuleList`` of them
when one block holds several sites). ViT-like encoders keep their blocks' classes (their host runs the blocks)
and swap the model class instead, whose forward carries the merge state from block to block.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from .mask import TokenMerger

__all__ = ["Family"]


def _one_site(block: nn.Module) -> int:
    return 1


@dataclass(frozen=True)
class Family:
    """How LTM patches one model family.

    name: short name (``vit``, ``swin``, ...). marker: the timm class whose presence identifies the family
    in a model, or ``accepts``: a test of the model instead. block / ltm_block: the timm block class that is
    patched and its LTM subclass (None: blocks keep their class and only get their ``ltm``). find: the blocks to
    patch, in forward order (default: every ``block`` instance among ``model.modules()``). sites: merge sites in
    one block (several for a MobileViT block, one per transformer layer); stacked: ``ltm`` is always a
    ``ModuleList`` (even for one site). persistent: where merges compose, ``"model"`` (ViT: block to block) or
    ``"block"`` (MobileViT: layer to layer inside a block); None when every block unmerges what it merged (Swin,
    EfficientViT). wrap / unwrap: what else is patched and unpatched in the model (ViT-like encoders: the model's
    class, whose forward carries the merge state from block to block). check: raises for variants the LTM block
    does not implement. layout: for merge maps, (model, site, window) -> ((rows, columns) of windows, (H, W) of
    the map) (Swin).
    """

    name: str
    marker: type | None = None
    block: type | None = None
    ltm_block: type | None = None
    accepts: Callable[[nn.Module], bool] | None = None
    persistent: str | None = None
    find: Callable[[nn.Module], list[nn.Module]] | None = None
    sites: Callable[[nn.Module], int] = _one_site
    stacked: bool = False
    wrap: Callable[[nn.Module], None] | None = None
    unwrap: Callable[[nn.Module], None] | None = None
    check: Callable[[nn.Module, list[nn.Module]], None] | None = None
    layout: Callable[[nn.Module, str, tuple[int, int]], tuple[tuple[int, int], tuple[int, int]]] | None = None

    def matches(self, model: nn.Module) -> bool:
        """True if ``model`` (or a ``features_only`` wrapper of it) is of this family."""
        if self.accepts is not None:
            return self.accepts(model)
        return any(isinstance(m, self.marker) for m in model.modules())

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks LTM patches (or has patched), in forward order."""
        if self.find is not None:
            return self.find(model)
        return [m for m in model.modules() if isinstance(m, self.block)]

    def num_sites(self, model: nn.Module) -> int:
        return sum(self.sites(b) for b in self.blocks(model))

    def swap_in(self, model: nn.Module, ratios: Sequence[float], **merger_kwargs: Any) -> None:
        """Patch every block of ``model`` in place: one ratio per merge site, in forward order."""
        blocks = self.blocks(model)
        for i, blk in enumerate(blocks if self.block is not None else ()):
            if type(blk) is not self.block:
                raise UnsupportedModelError(f"LTM supports timm's {self.block.__name__} in {self.name} models; block "
                                            f"{i} is {type(blk).__name__}")
        if self.check is not None:
            self.check(model, blocks)
        sites = [self.sites(b) for b in blocks]
        if len(ratios) != sum(sites):
            raise InvalidArgumentError(f"LTM needs one ratio per {self.name} merge site: got {len(ratios)} for "
                                       f"{sum(sites)} sites ({', '.join(map(str, sites))} per block)")
        it = iter(ratios)
        for blk, n in zip(blocks, sites):
            mergers = [TokenMerger(next(it), **merger_kwargs) for _ in range(n)]
            if self.ltm_block is not None:
                blk.__class__ = self.ltm_block
            blk.ltm = nn.ModuleList(mergers) if self.stacked else mergers[0]
        if self.wrap is not None:
            self.wrap(model)

    def swap_out(self, model: nn.Module) -> None:
        """Undo :meth:`swap_in` (learned temperatures, if any, are dropped)."""
        for blk in self.blocks(model):
            del blk.ltm
            if self.block is not None:
                blk.__class__ = self.block
        if self.unwrap is not None:
            self.unwrap(model)

    def chains(self, model: nn.Module) -> dict[str, Any]:
        """Merge-site name -> chain id for merges that compose (one chain per model or per block)."""
        if self.persistent is None:
            return {}
        names = [n for n, m in model.named_modules() if isinstance(m, TokenMerger)]
        if self.persistent == "model":
            return {n: 0 for n in names}
        return {n: n.rsplit(".ltm", 1)[0] for n in names}  # the owning block's name
