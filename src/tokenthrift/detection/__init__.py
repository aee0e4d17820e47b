"""Detection and instance segmentation: torchvision's Mask R-CNN / Faster R-CNN with timm (and LTM) backbones
(:mod:`.model`). docs/methods.md §7. COCO data, the Fashion-MNIST collage set and the COCO metrics live in
:mod:`tokenthrift.data.coco`; training in the engine (``--task detection``).
"""
from .model import (
    DETECTORS,
    DetectionBatch,
    SimpleFeaturePyramid,
    TimmBackbone,
    TimmFasterRCNN,
    TimmMaskRCNN,
    fasterrcnn,
    load_backbone_weights,
    maskrcnn,
)

__all__ = ["DETECTORS", "DetectionBatch", "SimpleFeaturePyramid", "TimmBackbone", "TimmFasterRCNN", "TimmMaskRCNN",
           "fasterrcnn", "load_backbone_weights", "maskrcnn"]
