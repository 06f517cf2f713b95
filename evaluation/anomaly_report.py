"""Report pieces of an anomaly model (``task=anomaly``): the score histograms of good and defective samples with the
threshold, the ROC curve, the AUROC table, and heat-map tiles of the worst misses and the highest-scoring good parts
(for the HTML report and the review page). Arrays in, HTML or :class:`evaluation.report.Miss` tiles out; no I/O.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from defectops.evaluation.anomaly import roc_points
from defectops.evaluation.gradcam import overlay
from defectops.evaluation.report import Miss

__all__ = ["anomaly_section", "boxes_table", "heatmap_tiles"]

Corners = Sequence[float]


def _plot(draw: Any) -> str:
    from matplotlib.figure import Figure

    from defectops.evaluation.report import _png_data_uri

    fig = Figure(figsize=(5.2, 3.4))
    draw(fig.add_subplot(1, 1, 1))
    return _png_data_uri(fig)


def _histogram(good: np.ndarray, bad: np.ndarray, threshold: float, title: str) -> str:
    def draw(ax: Any) -> None:
        both = np.concatenate([good, bad]) if len(bad) else good
        bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 30) if len(both) else 10
        ax.hist(good, bins=bins, alpha=0.6, label=f"good ({len(good)})", color="#2a7")
        if len(bad):
            ax.hist(bad, bins=bins, alpha=0.6, label=f"defective ({len(bad)})", color="#c33")
        ax.axvline(threshold, color="black", linestyle="--", label="threshold")
        ax.set_xlabel("image score (raw)")
        ax.set_ylabel("images")
        ax.set_title(title)
        ax.legend(fontsize=8)

    return _plot(draw)


def _roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    def draw(ax: Any) -> None:
        for name, (fpr, tpr) in curves.items():
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_xlabel("false-call rate (good parts flagged)")
        ax.set_ylabel("recall of defective parts")
        ax.set_title("ROC")
        ax.legend(fontsize=8)

    return _plot(draw)


def anomaly_section(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                    doc: Mapping[str, Any]) -> str:
    """HTML: the AUROC table (with intervals), the threshold and how it was chosen, histograms of val and test
    scores, and the ROC curves. ``val`` and ``test``: ``(is_defective, scores)``; ``doc``: the evaluation record
    (``RUN.anomaly``)."""
    thr = doc["threshold"]
    rows = []
    for split in ("val", "test"):
        d = doc[split]
        ci = d["image_auroc"]
        auroc = "n/a" if ci["point"] is None else f"{ci['point']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
        pixel = d.get("pixel_auroc")
        rows.append(f"<tr><td>{split}</td><td>{auroc}</td><td>{'n/a' if pixel is None else f'{pixel:.4f}'}</td>"
                    f"<td>{d['n_good']}</td><td>{d['n_defect']}</td></tr>")
    val_note = (f"val escape rate {thr['val_escape_rate']:.3f}" if thr["val_escape_rate"] is not None
                else "no defective val samples")
    rule = html.escape(f"threshold {thr['value']:.5g}, chosen on val for {thr['rule']} <= {thr['target']} "
                       f"({val_note}, val false-call rate {thr['val_false_call_rate']:.3f}); normalisation "
                       f"{doc['normalization']['version']} (scale {doc['normalization']['scale']:.4g})")
    note = f"<p>{html.escape(thr['note'])}</p>" if thr.get("note") else ""
    curves = {}
    for name, (y, s) in (("val", val), ("test", test)):
        if len(s) and 0 < int(np.sum(y)) < len(y):
            fpr, tpr, _ = roc_points(y, s)
            curves[name] = (fpr, tpr)
    plots = "".join(f'<img alt="{html.escape(t)}" src="{uri}">' for t, uri in (
        ("val scores", _histogram(val[1][~val[0]], val[1][val[0]], thr["value"], "val scores")),
        ("test scores", _histogram(test[1][~test[0]], test[1][test[0]], thr["value"], "test scores")),
        *((("ROC", _roc(curves)),) if curves else ())))
    boxes = boxes_table(doc["boxes"]) if doc.get("boxes") else ""
    return (f"<p>{rule}</p>{note}<table><thead><tr><th>split</th><th>image AUROC [interval]</th><th>pixel AUROC</th>"
            f"<th>good</th><th>defective</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{boxes}{plots}")


def boxes_table(doc: Mapping[str, Any]) -> str:
    """HTML: boxes from anomaly maps on board pairs (type-agnostic, DeepPCB rule), val and test, with the map
    threshold and how it was chosen; ``doc``: ``RUN.anomaly``'s ``boxes``."""
    if "map_threshold" not in doc:
        return f"<p>Boxes from maps: {html.escape(str(doc.get('note', 'not computed')))}</p>"
    t = doc["map_threshold"]

    def ci(d: Mapping[str, Any]) -> str:
        return "n/a" if d["point"] is None else f"{d['point']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    rows = "".join(
        f"<tr><td>{split}</td><td>{d['n_images']}</td><td>{d['n_gt']}</td><td>{ci(d['recall'])}</td>"
        f"<td>{ci(d['precision'])}</td><td>{d['deeppcb']['fscore']:.3f}</td><td>{d['deeppcb']['map']:.3f}</td>"
        f"<td>{d['n_boxes'] / max(d['n_images'], 1):.1f}</td>"
        f"<td>{d['boxes_on_good'] / max(d['good_images'], 1):.2f}</td></tr>"
        for split, d in (("val", doc["val"]), ("test", doc["test"])))
    rule = html.escape(f"Boxes from anomaly maps (type-agnostic, found at IoU > {doc['val']['iou']}): regions of at "
                       f"least {doc['min_area']} map pixels above the map threshold {t['value']:.5g}, chosen on val "
                       f"({t['rule']}); intervals: 95 % Wilson over defects (recall) and boxes (precision).")
    return (f"<p>{rule}</p><table><thead><tr><th>split</th><th>defective boards</th><th>defects</th>"
            "<th>box recall [interval]</th><th>box precision [interval]</th><th>DeepPCB F (agnostic)</th>"
            "<th>DeepPCB mAP (agnostic)</th><th>boxes / defective board</th><th>boxes / good image</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def heatmap_tiles(images: np.ndarray, maps: np.ndarray, is_defect: np.ndarray, scores: np.ndarray,
                  threshold: float, classes: Sequence[str], limit: int = 16,
                  boxes: Sequence[tuple[Sequence[Corners], Sequence[Corners]]] | None = None) -> list[Miss]:
    """Anomaly-map overlays of the escaped defects (lowest scores first), the false calls (highest first) and, to
    fill ``limit``, the highest-scoring good parts that passed: what a reviewer should look at. ``boxes`` (board
    pairs): per image, the annotated boxes (drawn green) and the boxes from its map (red), in image pixels."""
    good_name, bad_name = classes[0], classes[1]
    flagged = scores >= threshold
    escaped = np.flatnonzero(is_defect & ~flagged)
    escaped = escaped[np.argsort(scores[escaped])]
    false_calls = np.flatnonzero(~is_defect & flagged)
    false_calls = false_calls[np.argsort(-scores[false_calls])]
    passed = np.flatnonzero(~is_defect & ~flagged)
    passed = passed[np.argsort(-scores[passed])]
    chosen = [*escaped, *false_calls, *passed][:limit]
    lo, hi = float(np.min(maps)) if len(maps) else 0.0, float(np.max(maps)) if len(maps) else 1.0
    tiles = []
    for i in chosen:
        cam = (maps[i] - lo) / (hi - lo) if hi > lo else np.zeros_like(maps[i])
        kind = "escaped defect" if is_defect[i] else ("false call" if flagged[i] else "good part, high score")
        tile = overlay(images[i], cam)
        if boxes is not None:
            tile = _draw_boxes(tile, *boxes[i])
        tiles.append(Miss(image=tile, true_label=bad_name if is_defect[i] else good_name,
                          predicted=bad_name if flagged[i] else good_name, confidence=float(scores[i]),
                          caption=f"{kind}: score {scores[i]:.4g} (threshold {threshold:.4g}); anomaly map over the "
                                  "image, one colour scale for all tiles"))
    return tiles


def _draw_boxes(image: np.ndarray, truths: Sequence[Corners], found: Sequence[Corners]) -> np.ndarray:
    import cv2

    out = np.ascontiguousarray(image.copy())
    for corners, colour in ((truths, (40, 200, 80)), (found, (230, 40, 40))):
        for b in corners:
            cv2.rectangle(out, (int(b[0]), int(b[1])), (max(int(b[0]), round(b[2]) - 1),
                                                        max(int(b[1]), round(b[3]) - 1)), colour, 1)
    return out
