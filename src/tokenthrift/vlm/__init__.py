"""Visual tokens in vision-language models: one reducer API over transformers' LLaVA and Qwen2-VL (docs/methods.md
§11).

:func:`reduce` cuts the visual tokens of every image to K before the language model (prompt placeholders, attention
mask, labels and, for Qwen2-VL, token types and M-RoPE positions rewritten; ``generate`` with its KV cache); the
reducers are pure tensor functions (:mod:`.reducers`): random and spatial pooling (the baselines), DivPrune's
max-min diversity, the tower's CLS attention and ToMe's bipartite merging on the connector's tokens, and two that
work inside the vision tower (LLaVA): ToMe (``tower-merge``) and VisionZip (``visionzip``).
"""
from .api import reduce, remove
from .core import METHODS, TOWER_MERGE, VISIONZIP, VLMHandle, get_handle
from .reducers import REDUCERS, reduce_tokens

__all__ = ["METHODS", "REDUCERS", "TOWER_MERGE", "VISIONZIP", "VLMHandle", "get_handle", "reduce", "reduce_tokens",
           "remove"]
