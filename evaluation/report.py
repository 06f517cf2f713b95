"""Self-contained HTML evaluation report for one candidate model.

What: :func:`render_report` writes a single HTML file with the run information, the release-gate verdicts, the
metrics tables, three plots (confusion matrix as counts and row-normalised, one-vs-rest PR curves with AP,
per-class recall/precision bars with the recall gates), a gallery of the worst misses, the shortcut check (can
metadata alone predict the class?) and any extra sections.

Why: reviewers approve promotions from this file, often offline or as an MLflow artifact, so it embeds
everything (plots and thumbnails as base64 PNG, inline CSS, no scripts, no external resources) and is written
atomically so a reader never sees a half-written report. Plots are drawn on standalone ``Figure`` objects
rendered by the Agg canvas, which leaves pyplot's global state and the selected backend untouched. All text
coming from callers (class names, info, captions, section titles) is HTML-escaped by Jinja2 autoescaping; only
the bodies of ``sections`` are trusted, pre-rendered HTML.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave

from defectops.evaluation.gates import GateReport, GateResult
from defectops.evaluation.intervals import ClassificationIntervals
from defectops.evaluation.metrics import ClassificationMetrics, PRCurve
from defectops.evaluation.shortcut import ShortcutReport

__all__ = ["Miss", "miss_png", "render_report", "write_miss_tiles"]

_THUMB_MAX_SIDE = 256  # larger miss images are downsampled so the report stays small
_DPI = 110
_PASS_COLOR = "#1a7f37"
_FAIL_COLOR = "#cf222e"
# drop the "Software" PNG text chunk (it carries a URL and a version string); None removes a key in matplotlib
_PNG_METADATA: dict[str, Any] = {"Software": None}


@dataclass(frozen=True, eq=False)
class Miss:
    """A misclassified sample for the gallery.

    ``image`` is ``HxW`` (grey) or ``HxWx3`` (RGB) ``uint8``; a Grad-CAM overlay can be passed instead of the raw
    crop. ``confidence`` is the model's score for ``predicted``.
    """

    image: np.ndarray
    true_label: str
    predicted: str
    confidence: float
    caption: str = ""

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise ValueError(
                f"Miss.image must be a uint8 numpy array, got {type(img).__name__} {getattr(img, 'dtype', '')}"
            )
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"Miss.image must be HxW or HxWx3, got shape {img.shape}")
        if not math.isfinite(self.confidence):
            raise ValueError(f"Miss.confidence must be finite, got {self.confidence}")


# ---------------------------------------------------------------------------------------------------------------
# formatting helpers


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}"


def _gate_value(result: GateResult, x: float | None) -> str:
    if result.metric == "latency_ms":
        return "n/a" if x is None or math.isnan(x) else f"{x:.2f} ms"
    return _num(x)


def _mpl_text(s: str) -> str:
    """Escape ``$`` so that a class name is never parsed as mathtext."""
    return s.replace("$", r"\$")


# ---------------------------------------------------------------------------------------------------------------
# plots


def _png_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)  # attach an Agg canvas to this figure only; no global backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata=_PNG_METADATA)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def miss_png(m: Miss) -> bytes:
    """The PNG the gallery shows for ``m``: RGB, downsampled (by striding) to at most 256 px a side."""
    image = m.image
    step = max(1, math.ceil(max(image.shape[:2]) / _THUMB_MAX_SIDE))
    img = image[::step, ::step]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    buf = io.BytesIO()
    imsave(buf, np.ascontiguousarray(img), format="png", metadata=_PNG_METADATA)
    return buf.getvalue()


def _miss_data_uri(m: Miss) -> str:
    return "data:image/png;base64," + base64.b64encode(miss_png(m)).decode("ascii")


def write_miss_tiles(out: Path, misses: Sequence[Miss]) -> Path:
    """Write the gallery as files (for the review page): ``out/miss-NN.png`` (exactly what the report embeds) and
    ``out/index.json`` listing ``file``, ``true_label``, ``predicted``, ``confidence``, ``caption`` in gallery order.
    ``out`` is replaced as a whole (written under a temp name, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    index = []
    for i, m in enumerate(misses):
        name = f"miss-{i:02d}.png"
        (tmp / name).write_bytes(miss_png(m))
        index.append({"file": name, "true_label": m.true_label, "predicted": m.predicted,
                      "confidence": float(m.confidence), "caption": m.caption})
    (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _style_ticks(ax: Axes, labels: list[str], good_index: int) -> None:
    ticks = list(range(len(labels)))
    ax.set_xticks(ticks, labels, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        tick_labels[good_index].set_fontweight("bold")
        tick_labels[good_index].set_color(_PASS_COLOR)


def _confusion_plot(metrics: ClassificationMetrics) -> str:
    cm = np.asarray(metrics.confusion, dtype=np.float64)
    n = len(metrics.classes)
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, cm / rows, np.nan)
    labels = [_mpl_text(c) for c in metrics.classes]
    g = metrics.classes.index(metrics.good_class)
    side = 1.6 + 0.62 * n
    fig = Figure(figsize=(2 * side + 0.8, side), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    font = max(6.0, 10.0 - 0.25 * n)
    panels: tuple[tuple[Axes, np.ndarray, str, str], ...] = (
        (ax_counts, cm, "Counts", "d"),
        (ax_norm, norm, "Row-normalised (recall on the diagonal)", ".2f"),
    )
    for ax, data, title, fmt in panels:
        vmax = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
        ax.imshow(np.nan_to_num(data, nan=0.0), cmap="Blues", vmin=0.0, vmax=max(vmax, 1e-12))
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                text = "-" if math.isnan(v) else format(int(v) if fmt == "d" else v, fmt)
                dark = not math.isnan(v) and v > 0.55 * vmax
                ax.text(j, i, text, ha="center", va="center", fontsize=font, color="white" if dark else "#24292f")
        _style_ticks(ax, labels, g)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=11)
    return _png_data_uri(fig)


def _ordered_curves(curves: Mapping[str, PRCurve], classes: Sequence[str]) -> list[PRCurve]:
    known = [curves[c] for c in classes if c in curves]
    return known + [v for k, v in curves.items() if k not in classes]


def _pr_plot(curves: Mapping[str, PRCurve], classes: Sequence[str]) -> str:
    ordered = _ordered_curves(curves, classes)
    cmap = _colormap(len(ordered))
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    for i, curve in enumerate(ordered):
        name = _mpl_text(curve.label)
        if not curve.recall:
            ax.plot([], [], color=cmap[i], label=f"{name} (no samples)")
            continue
        label = f"{name} (AP {curve.average_precision:.3f})"
        ax.plot(curve.recall, curve.precision, drawstyle="steps-post", color=cmap[i], lw=1.8, label=label)
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    return _png_data_uri(fig)


def _colormap(n: int) -> list[tuple[float, float, float, float]]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _bars_plot(metrics: ClassificationMetrics, thresholds: Mapping[str, float]) -> str:
    classes = list(metrics.classes)
    n = len(classes)
    x = np.arange(n, dtype=np.float64)
    width = 0.38
    recall = np.array([metrics.per_class_recall[c] for c in classes], dtype=np.float64)
    precision = np.array([metrics.per_class_precision[c] for c in classes], dtype=np.float64)
    fig = Figure(figsize=(max(6.5, 1.0 + 0.95 * n), 4.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - width / 2, np.nan_to_num(recall), width, label="recall", color="#0969da")
    ax.bar(x + width / 2, np.nan_to_num(precision), width, label="precision", color="#8c959f")
    gate_label = "recall gate"
    for i, c in enumerate(classes):
        if c in thresholds:
            ax.hlines(thresholds[c], x[i] - width, x[i], colors="#24292f", linewidth=2, label=gate_label)
            gate_label = "_nolegend_"
        recall_top = max(0.0 if math.isnan(recall[i]) else recall[i], thresholds.get(c, 0.0))  # label above the gate
        for offset, v, top in ((-width / 2, recall[i], recall_top), (width / 2, precision[i], precision[i])):
            text = "n/a" if math.isnan(v) else f"{v:.2f}"
            ax.text(
                x[i] + offset, (0.0 if math.isnan(top) else top) + 0.015, text, ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks(x, [_mpl_text(c) for c in classes], rotation=30, ha="right", rotation_mode="anchor")
    g = classes.index(metrics.good_class)
    ax.get_xticklabels()[g].set_fontweight("bold")
    ax.get_xticklabels()[g].set_color(_PASS_COLOR)
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=3, fontsize=8, frameon=False)
    return _png_data_uri(fig)


# ---------------------------------------------------------------------------------------------------------------
# template


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    source = resources.files("defectops.evaluation").joinpath("templates", "report.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def _context(
    *,
    title: str,
    metrics: ClassificationMetrics,
    gates: GateReport,
    curves: Mapping[str, PRCurve],
    info: Mapping[str, str],
    misses: Sequence[Miss],
    sections: Sequence[tuple[str, str]],
    intervals: ClassificationIntervals | None = None,
    split_note: str = "",
    shortcut: ShortcutReport | None = None,
    quarantine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    def bounds(iv: Any) -> str:
        return "" if iv is None else str(iv.format_bounds(4))

    per_class_iv = intervals.per_class_recall if intervals else {}
    recall_gates = {r.name: r for r in gates.results if r.name.startswith("recall[")}
    thresholds = {c: recall_gates[f"recall[{c}]"].threshold for c in metrics.classes if f"recall[{c}]" in recall_gates}
    class_rows = []
    for c in metrics.classes:
        gate = recall_gates.get(f"recall[{c}]")
        curve = curves.get(c)
        class_rows.append(
            {
                "name": c,
                "good": c == metrics.good_class,
                "support": metrics.support[c],
                "recall": _num(metrics.per_class_recall[c]),
                "recall_interval": bounds(per_class_iv.get(c)),
                "recall_state": "" if gate is None else ("pass" if gate.passed else "fail"),
                "threshold": "" if gate is None else _num(gate.threshold),
                "precision": _num(metrics.per_class_precision[c]),
                "f1": _num(metrics.per_class_f1[c]),
                "ap": "n/a" if curve is None else _num(curve.average_precision),
            }
        )
    summary = [
        ("samples", str(metrics.n), ""),
        ("accuracy", _num(metrics.accuracy), ""),
        ("macro recall", _num(metrics.macro_recall), bounds(intervals.macro_recall if intervals else None)),
        ("macro precision", _num(metrics.macro_precision), ""),
        ("escape rate (defects called good)", _num(metrics.escape_rate),
         bounds(intervals.escape_rate if intervals else None)),
        ("false-call rate (good still flagged)", _num(metrics.false_call_rate),
         bounds(intervals.false_call_rate if intervals else None)),
    ]
    gate_rows = [
        {
            "name": r.name,
            "metric": r.metric,
            "value": _gate_value(r, r.value),
            "comparison": "≥" if r.comparison == ">=" else "≤",
            "threshold": _gate_value(r, r.threshold),
            "passed": r.passed,
            "detail": r.detail,
        }
        for r in gates.results
    ]
    plots = [
        ("Confusion matrix", _confusion_plot(metrics), "confusion matrix, counts and row-normalised"),
        ("Precision-recall curves", _pr_plot(curves, metrics.classes), "one-vs-rest precision-recall curves"),
        ("Recall and precision per class", _bars_plot(metrics, thresholds), "per-class recall and precision bars"),
    ]
    gallery = [
        {
            "uri": _miss_data_uri(m),
            "true_label": m.true_label,
            "predicted": m.predicted,
            "confidence": f"{m.confidence:.3f}",
            "caption": m.caption,
        }
        for m in misses
    ]
    return {
        "title": title,
        "passed": gates.passed,
        "n_failed": len(gates.failed()),
        "n_gates": len(gates.results),
        "info": [(str(k), str(v)) for k, v in info.items()],
        "good_class": metrics.good_class,
        "classes": list(metrics.classes),
        "summary": summary,
        "has_intervals": intervals is not None,
        "split_note": split_note,
        "class_rows": class_rows,
        "gate_rows": gate_rows,
        "plots": plots,
        "misses": gallery,
        "sections": [(str(t), markupsafe.Markup(body)) for t, body in sections],
        "shortcut": _shortcut_context(shortcut),
        "quarantine": _quarantine_context(quarantine),
    }


def _quarantine_context(v: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``validate_data`` report (``validation.json``) as the "Quarantined samples" section; None when nothing was
    quarantined (or no report)."""
    if not v or not v.get("quarantined"):
        return None
    rows = [(str(q.get("path", "")), str(q.get("kind", "")), str(q.get("reason", ""))) for q in v["quarantined"]]
    budget = v.get("bad_file_budget")
    note = (f"{v.get('bad', len(rows))} bad (label conflicts aside) against a bad-file budget of {budget} "
            f"({v.get('bad_file_budget_rule', '')})" if budget is not None else "")
    return {"count": len(rows), "total": v.get("total"), "rows": rows, "note": note}


def _shortcut_context(s: ShortcutReport | None) -> dict[str, Any] | None:
    if s is None:
        return None
    rows = []
    if s.checked:
        rows = [
            ("balanced accuracy from metadata", f"{_num(s.balanced_accuracy, 3)} (chance {_num(s.chance, 3)})"),
            ("chance-corrected score", f"{_num(s.score, 3)} (warns at {_num(s.warn_at, 2)}; 0 = chance, 1 = perfect)"),
            ("most predictive feature", f"{s.top_feature} ({_num(s.top_feature_score, 3)})"),
        ]
    rows += [("features checked", ", ".join(s.features) or "none"), ("samples (train + val)", str(s.n_samples))]
    return {
        "warn": s.warn,
        "checked": s.checked,
        "message": s.message,
        "note": s.note,
        "rows": rows,
        "per_feature": [(k, _num(v, 3)) for k, v in sorted(s.per_feature.items(), key=lambda kv: -kv[1])],
        "per_class_recall": [(k, _num(v, 3)) for k, v in s.per_class_recall.items()],
    }


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path`` and ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def render_report(
    path: Path,
    *,
    title: str,
    metrics: ClassificationMetrics,
    gates: GateReport,
    curves: dict[str, PRCurve],
    info: dict[str, str],
    misses: Sequence[Miss] = (),
    sections: Sequence[tuple[str, str]] = (),
    intervals: ClassificationIntervals | None = None,
    split_note: str = "",
    shortcut: ShortcutReport | None = None,
    quarantine: Mapping[str, Any] | None = None,
) -> Path:
    """Render the evaluation report to ``path`` (created or replaced atomically) and return ``path``.

    Inputs: ``metrics`` / ``gates`` / ``curves`` of the candidate (curves keyed by class name, as returned by
    :func:`evaluation.metrics.pr_curves`); ``info`` free key/value pairs for the header (run id, model, dataset
    fingerprint, ...); ``misses`` the gallery, shown in the given order; ``sections`` extra ``(title, html)``
    blocks appended at the end, where ``html`` is trusted, pre-rendered HTML inserted verbatim (escape any
    untrusted content in it yourself). Everything else is escaped. ``intervals`` (of ``metrics``) are shown in
    brackets next to macro recall, the two rates and each class's recall; ``split_note`` is a sentence under the
    metrics saying which split the figures come from and what the brackets are. ``shortcut`` (the
    ``validate_data`` step's :class:`evaluation.shortcut.ShortcutReport`) adds a "Shortcut check" section, and a
    banner at the top when it warns that metadata predicts the class. ``quarantine`` (``validation.json`` of the
    ``validate_data`` step) adds a "Quarantined samples" section listing each sample left out with its reason.
    """
    path = Path(path)
    html = _template().render(
        **_context(
            title=title, metrics=metrics, gates=gates, curves=curves, info=info, misses=misses, sections=sections,
            intervals=intervals, split_note=split_note, shortcut=shortcut, quarantine=quarantine,
        )
    )
    _atomic_write_text(path, html)
    return path
