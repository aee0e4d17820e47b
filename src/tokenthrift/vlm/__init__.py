"""Visual tokens in vision-language models: one reducer API over transformers' vision-language models (docs/methods.md
§11), one core for every family and one file per family, found through one table (:data:`FAMILIES`).

:func:`reduce` cuts the visual tokens of every image to K before the language model (prompt placeholders, attention
mask, labels, the family's token types and positions rewritten; ``generate`` with its KV cache); the reducers are
pure tensor functions (:mod:`.reducers`): random and spatial pooling (the baselines), DivPrune's max-min diversity,
the tower's CLS attention and ToMe's bipartite merging on the connector's tokens, and two that work inside a vision
tower with a class token: ToMe (``tower-merge``) and VisionZip (``visionzip``).
"""
from .api import reduce, remove
from .core import METHODS, TOWER_MERGE, VISIONZIP, VLMHandle, get_handle
from .families import FAMILIES
from .reducers import REDUCERS, reduce_tokens

__all__ = ["FAMILIES", "METHODS", "REDUCERS", "TOWER_MERGE", "VISIONZIP", "VLMHandle", "get_handle", "reduce",
           "reduce_tokens", "remove"]
