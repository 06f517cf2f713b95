"""Inspecting one board with a resolved model, whatever its task, and swapping the model while requests are in flight.

- :func:`load_inspector` builds the :class:`Inspector` of a registered version's verified ONNX export: a board
  detector (``aoi``: template differencing + the crop classifier, needs the board's template), a whole-image
  classifier (``folder``: a defect when the predicted class is not the good one) or an anomaly model (``anomaly``: a
  defect when the image score reaches its threshold; a board model's map regions become ``defect`` boxes).
- :class:`ModelHolder` keeps the current inspector; :meth:`ModelHolder.swap` replaces it in one reference
  assignment. A request takes the inspector once, at its start, and finishes with it: a champion swap never drops or
  fails a request in flight, and every result names the version that produced it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from defectops.serving.line.results import LineDefect, ModelInfo
from defectops.serving.model_ref import ResolvedModel

LocationFn = Callable[[tuple[float, float, float, float], int, int], str]


class InspectionError(ValueError):
    """The board cannot be inspected as sent (no template for a board model, an unreadable image)."""


@dataclass(frozen=True)
class Verdict:
    """What a model says of one board: its defects and, for an anomaly model, the raw image score."""

    defects: tuple[LineDefect, ...]
    failed: bool
    score: float | None = None


class Inspector(Protocol):
    info: ModelInfo
    needs_template: bool

    def inspect(self, tested: Path, template: Path | None, location: LocationFn) -> Verdict: ...


def _size(path: Path) -> tuple[int, int]:
    from defectops.training.images import ImageError, image_size

    try:
        return image_size(path)
    except ImageError as e:
        raise InspectionError(f"{path.name}: {e}") from None


class BoardInspector:
    """``aoi`` models: candidates from template differencing, each classified by the crop model."""

    needs_template = True

    def __init__(self, model: ResolvedModel, info: ModelInfo, threads: int) -> None:
        from defectops.serving.predict import detector_for

        self.info = info
        self.detector = detector_for(model, threads)

    def inspect(self, tested: Path, template: Path | None, location: LocationFn) -> Verdict:
        from defectops.serving.detector import detections_from_probs

        if template is None:
            raise InspectionError(f"model {self.info.name} v{self.info.version} compares each board with its "
                                  "template: send the template image or a template id")
        w, h = _size(tested)
        _size(template)
        try:
            (r,) = list(self.detector.run([(tested.stem, template, tested)]))
        except ValueError as e:  # read_pair: sizes differ, unreadable file
            raise InspectionError(str(e)) from None
        dets = detections_from_probs(r.candidates, r.probs, self.detector.s, r.shape)
        defects = tuple(LineDefect(d.label, d.box, d.confidence, location(d.box, w, h)) for d in dets)
        return Verdict(defects, bool(defects))


class ImageClassifierInspector:
    """``folder`` models: the whole image classified; any class but the good one is a defect covering the image."""

    needs_template = False

    def __init__(self, model: ResolvedModel, info: ModelInfo, threads: int) -> None:
        from defectops.serving.onnx_export import onnx_session

        self.info, self.model = info, model
        self.session = onnx_session(model.onnx_path, threads=threads, spinning=False)

    def inspect(self, tested: Path, template: Path | None, location: LocationFn) -> Verdict:
        from defectops.serving.onnx_export import onnx_logits
        from defectops.training.engine import softmax
        from defectops.training.images import ImageError, preprocess_for_model

        w, h = _size(tested)
        try:
            x = preprocess_for_model([tested], self.model.input_size, self.model.fit_mode)
        except ImageError as e:
            raise InspectionError(f"{tested.name}: {e}") from None
        probs = softmax(onnx_logits(self.session, x))[0]
        k = int(probs.argmax())
        label = self.model.classes[k]
        if label == self.model.good_class:
            return Verdict((), False)
        box = (0.0, 0.0, float(w), float(h))
        return Verdict((LineDefect(label, box, float(probs[k]), location(box, w, h)),), True)


class AnomalyInspector:
    """``anomaly`` models: a defect when the image score reaches the threshold; a board model's map regions above its
    map threshold become type-agnostic ``defect`` boxes (else one box covering the image)."""

    needs_template = False

    def __init__(self, model: ResolvedModel, info: ModelInfo, threads: int) -> None:
        from defectops.evaluation.anomaly import ScoreNormalization
        from defectops.serving.onnx_export import onnx_session

        if model.input_hw is None or not model.anomaly:
            raise InspectionError(f"{model.source} has no anomaly operating point in its metadata: re-export it")
        self.info, self.model = info, model
        self.threshold = float(model.anomaly["threshold"])
        self.norm = ScoreNormalization.from_dict(model.anomaly["normalization"])
        self.rule: dict[str, Any] = model.anomaly.get("boxes") or {}
        self.session = onnx_session(model.onnx_path, threads=threads, spinning=False)

    def inspect(self, tested: Path, template: Path | None, location: LocationFn) -> Verdict:
        from defectops.evaluation.anomaly import anomaly_probabilities
        from defectops.evaluation.anomaly_boxes import map_detections
        from defectops.serving.onnx_export import ANOMALY_OUTPUTS
        from defectops.training.images import ImageError, resized_image

        assert self.model.input_hw is not None
        h, w = self.model.input_hw
        iw, ih = _size(tested)
        try:
            img = resized_image(tested, h, w)
        except ImageError as e:
            raise InspectionError(f"{tested.name}: {e}") from None
        x = img[None].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        scores, maps = self.session.run(list(ANOMALY_OUTPUTS), {"images": x})
        score = float(np.asarray(scores).reshape(-1)[0])
        if score < self.threshold:
            return Verdict((), False, score)
        p = float(anomaly_probabilities(np.array([score]), self.norm)[0, 1])
        if self.rule:
            dets = map_detections(np.asarray(maps)[0, 0], float(self.rule["map_threshold"]),
                                  min_area=int(self.rule["min_area"]), scale=(iw / w, ih / h))
            boxes = [(d.box, d.confidence) for d in dets] or [((0.0, 0.0, float(iw), float(ih)), p)]
        else:
            boxes = [((0.0, 0.0, float(iw), float(ih)), p)]
        return Verdict(tuple(LineDefect("defect", b, c, location(b, iw, ih)) for b, c in boxes), True, score)


INSPECTORS: dict[str, type[BoardInspector] | type[ImageClassifierInspector] | type[AnomalyInspector]] = {
    "aoi": BoardInspector, "folder": ImageClassifierInspector, "anomaly": AnomalyInspector}


def load_inspector(model: ResolvedModel, info: ModelInfo, *, threads: int = 2) -> Inspector:
    """The inspector of ``model`` (by its task); ValueError naming the tasks for an unknown one."""
    try:
        cls = INSPECTORS[model.task]
    except KeyError:
        raise ValueError(f"{model.source} is a {model.task!r} model: the line serves {', '.join(INSPECTORS)}") from None
    inspector: Inspector = cls(model, info, threads)
    return inspector


class ModelHolder:
    """The current inspector. :meth:`current` is read once per request; :meth:`swap` installs a fully loaded new one
    (readers never see a half-built model), and returns the previous one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: Inspector | None = None

    def current(self) -> Inspector | None:
        return self._current

    def swap(self, inspector: Inspector) -> Inspector | None:
        with self._lock:
            old, self._current = self._current, inspector
        return old
