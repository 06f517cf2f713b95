"""Sections of the evaluation report that the evaluate step assembles: the board-level table, the sentence on where
the figures come from, the shortcut check read back, and the worst misses with Grad-CAM.

Why apart from :mod:`evaluation.report`: that module renders any report from its parts; these build the parts from
a run's results (dicts as the steps write them) and its model.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from defectops.core.fsutil import read_json
from defectops.evaluation.gradcam import grad_cam, overlay
from defectops.evaluation.intervals import DEFAULT_RESAMPLES, ClassificationIntervals, Interval
from defectops.evaluation.report import Miss
from defectops.evaluation.shortcut import ShortcutReport
from defectops.training.data import to_tensor
from defectops.training.models import model_family


def gradcam_misses(net: Any, model_name: str, x: np.ndarray, y: np.ndarray, probs: np.ndarray,
                   classes: Sequence[str], limit: int = 16) -> list[Miss]:
    """The ``limit`` most confident wrong predictions, each with the Grad-CAM of the predicted class over its crop."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]])][:limit]
    cams: Any = (grad_cam(net, model_family(model_name), to_tensor(x[worst]), pred[worst].tolist())
                 if len(worst) else [])
    return [Miss(image=overlay(x[i], cam), true_label=classes[y[i]], predicted=classes[pred[i]],
                 confidence=float(probs[i, pred[i]]), caption="Grad-CAM of the predicted class over the crop")
            for i, cam in zip(worst, cams, strict=True)]


def read_shortcut(f: Path) -> ShortcutReport | None:
    """validate_data's shortcut check (its JSON file) for the report, or None when it was not run or is unreadable."""
    try:
        return ShortcutReport.from_dict(read_json(f)) if f.is_file() else None
    except (ValueError, TypeError, OSError):
        return None


def read_validation(f: Path) -> dict[str, Any] | None:
    """validate_data's report (``validation.json``: the quarantined samples with their reasons) for the report, or
    None when missing or unreadable."""
    try:
        doc = read_json(f) if f.is_file() else None
    except (ValueError, TypeError, OSError):
        return None
    return doc if isinstance(doc, dict) else None


def split_note(n_crops: int, intervals: ClassificationIntervals | None) -> str:
    """The report's sentence on where the figures come from and what their intervals are."""
    text = f"All figures are on the held-out test split ({n_crops} crops); training and selection use train and val."
    if intervals is None:
        return text
    level = f"{100 * intervals.confidence:g} %"
    text += f" Brackets: {level} Wilson score intervals for the recalls and rates"
    macro = intervals.macro_recall
    if macro is not None and macro.defined:
        text += f"; macro recall: percentile bootstrap over {macro.n} {macro.unit} ({DEFAULT_RESAMPLES} resamples)"
    return text + "."


def _iv(d: dict[str, Any] | None, key: str) -> str:
    if not d or not d.get(key):
        return ""
    return f' <span class="muted">{escape(Interval.from_dict(d[key]).format_bounds(4))}</span>'


def board_html(board: dict[str, Any]) -> str:
    rows, designs = [], []
    for split in ("val", "test"):
        if split in board:
            b = board[split]
            iv = b.get("intervals")
            ceiling = "-" if b.get("ceiling_recall") is None else f"{b['ceiling_recall']:.4f}"
            rows.append(f"<tr><td>{split}</td><td>{b['boards']}</td><td>{b['map']:.4f}{_iv(iv, 'map')}</td>"
                        f"<td>{b['fscore']:.4f}{_iv(iv, 'fscore')}</td>"
                        f"<td>{b['precision']:.4f}</td><td>{b['recall']:.4f}</td><td>{ceiling}</td>"
                        f"<td>{b['images_per_s']:.1f}</td></tr>")
            worst = (b.get("worst_group") or {}).get("group")
            for g, m in (b.get("per_group") or {}).items():
                mark = ' <span class="muted">(worst)</span>' if g == worst and len(b["per_group"]) > 1 else ""
                designs.append(f"<tr><td>{split}</td><td class=\"mono\">{escape(g)}{mark}</td><td>{m['boards']}</td>"
                               f"<td>{m['map']:.4f}</td><td>{m['fscore']:.4f}</td><td>{m['precision']:.4f}</td>"
                               f"<td>{m['recall']:.4f}</td></tr>")
    head = ("<table><thead><tr><th>split</th><th>boards</th><th>mAP</th><th>F-score</th><th>precision</th>"
            "<th>recall</th><th>candidate ceiling</th><th>images/s</th></tr></thead><tbody>")
    level = next((f"{100 * b['intervals']['map']['confidence']:g} %" for b in (board.get("test"), board.get("val"))
                  if b and b.get("intervals")), None)
    bootstrap = f" Brackets: {level} percentile bootstrap over boards ({DEFAULT_RESAMPLES} resamples, seed 0)."
    per_type = ", ".join(f"{k} {v}" for k, v in (board.get("type_thresholds") or {}).items())
    per_type = f" (per type: {escape(per_type)}; other types {board['score_threshold']})" if per_type else ""
    note = (f"<p>IoU &gt; {escape(str(0.33))}; score threshold {board['score_threshold']}{per_type} chosen on the val "
            f"split, applied unchanged to test.{bootstrap if level else ''}</p>")
    per_design = ("<h3>Per board design</h3><table><thead><tr><th>split</th><th>design</th><th>boards</th>"
                  "<th>mAP</th><th>F-score</th><th>precision</th><th>recall</th></tr></thead><tbody>"
                  + "".join(designs) + "</tbody></table>") if designs else ""
    return head + "".join(rows) + "</tbody></table>" + note + per_design
