"""The crop classifier: input normalisation and test-time augmentation folded into a plain ``nn.Module`` around a timm
backbone.

Normalisation lives inside the module so that the exported ONNX graph takes float32 crops in [0, 1] and every
consumer (onnxruntime, Triton, the review app) preprocesses identically. Test-time augmentation (TTA) lives here for
the same reason: in eval mode the module classifies the crop under several dihedral views (rotations by 90 degrees,
mirror images) and returns the log of the views' mean probability, so the evaluated PyTorch model, the ONNX export,
its INT8 version and Triton all compute the same thing. A PCB defect keeps its type under these views, and training
already augments with them (``train.augment.flips``/``rotate90``); averaging removes some of the orientation-dependent
errors (on DeepPCB, ``rot4`` raised the val mAP by 0.2-0.6 points, ``docs/deeppcb.md``). Training mode always sees
one view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

# view sets: (quarter turns, mirrored) per view; the first view is always the crop itself
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "hflip": ((0, False), (0, True)),
    "rot4": ((0, False), (1, False), (2, False), (3, False)),
    "d8": tuple((k, m) for m in (False, True) for k in range(4)),
}


def tta_views(name: str) -> tuple[tuple[int, bool], ...]:
    """The dihedral views of TTA mode ``name``; ValueError naming ``model.tta`` for an unknown one."""
    if name not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {name!r}: use one of {', '.join(TTA_VIEWS)} (model.tta=...)")
    return TTA_VIEWS[name]


def _view(x: torch.Tensor, turns: int, mirrored: bool) -> torch.Tensor:
    """``torch.rot90(x, turns, (2, 3))`` of ``x`` (mirrored left-right first), from flips and transposes, which ONNX
    exports (``rot90`` has no ONNX symbolic)."""
    if mirrored:
        x = torch.flip(x, dims=(3,))
    turns %= 4
    if turns == 1:
        return torch.flip(x, dims=(3,)).transpose(2, 3)
    if turns == 2:
        return torch.flip(x, dims=(2, 3))
    if turns == 3:
        return torch.flip(x.transpose(2, 3), dims=(3,))
    return x


class DefectClassifier(nn.Module):
    """``logits = backbone((x - mean) / std)`` for ``x`` of shape (N, C, H, W) in [0, 1].

    With ``tta`` other than ``"none"``, eval mode returns ``log(mean over views of softmax(logits(view)))``: valid
    logits whose softmax is the views' mean probability. Views that turn the crop need square crops.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, in_chans: int, mean: float = 0.5, std: float = 0.5,
                 tta: str = "none") -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.full((1, in_chans, 1, 1), mean))
        self.register_buffer("std", torch.full((1, in_chans, 1, 1), std))
        self.views = tta_views(tta)
        self.tta = tta
        self.weights_info: dict[str, str] = {}  # pretrained weights the backbone started from (create_model)

    def forward_single(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the crop itself (no TTA): what training optimises and Grad-CAM explains."""
        return cast(torch.Tensor, self.backbone((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = getattr(self, "views", TTA_VIEWS["none"])  # modules pickled before TTA existed have no views
        if self.training or len(views) == 1:
            return self.forward_single(x)
        if any(turns % 2 for turns, _ in views) and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"test-time augmentation {self.tta!r} turns crops and needs square ones, got "
                             f"{tuple(x.shape[-2:])}: use model.tta=hflip or none")
        n = x.shape[0]
        logits = self.forward_single(torch.cat([_view(x, t, m) for t, m in views]))
        logp = F.log_softmax(logits, dim=1).reshape(len(views), n, -1)
        return torch.logsumexp(logp, dim=0) - math.log(len(views))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding (pooled) of the crop itself, for drift profiles and retrieval."""
        feats = self.backbone.forward_features((x - self.mean) / self.std)  # type: ignore[operator]
        return cast(torch.Tensor, self.backbone.forward_head(feats, pre_logits=True))  # type: ignore[operator]


@contextmanager
def single_view(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` (a :class:`DefectClassifier`, or any other module, left alone) classifies the crop
    itself even in eval mode: for monitoring such as per-epoch validation accuracy, which TTA would make several times
    as expensive without changing what is trained."""
    if not isinstance(model, DefectClassifier) or not hasattr(model, "views"):
        yield
        return
    saved = model.views
    model.views = TTA_VIEWS["none"]
    try:
        yield
    finally:
        model.views = saved
