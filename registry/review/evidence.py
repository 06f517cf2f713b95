"""What the review page shows, read from the registry: the queue, one candidate beside the champion, the trail.

What: plain functions from an ``MlflowClient`` to dictionaries the templates render. A version's evidence is what its
register step logged to its run: ``metrics.json``, ``evidence/gates.json``, ``evidence/dataset.json``,
``evidence/validation.json``, ``evidence/misses/`` (worst misses with Grad-CAM overlays) and ``evidence/config.yaml``,
plus the version's tags and the run's params. Deltas compare the candidate with the current ``champion``. Confidence
intervals come from the ``intervals`` entry of ``metrics.json``; for a version registered before it existed, the
Wilson intervals are recomputed from its confusion matrix and macro recall has none.

Why here and not in the templates: the numbers a quality lead approves on must be computed once, testably, from the
same artifacts :mod:`registry.governance` hashes into the audit record; nothing here decides anything.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectops.core import tags as T
from defectops.evaluation.intervals import ClassificationIntervals, Interval
from defectops.registry.audit_store import RegistryTrail
from defectops.registry.config import RegistryConfig
from defectops.registry.governance import DECIDER_ROLES, NotFound

__all__ = ["candidate_view", "history_view", "queue_view"]

_PENDING = "pending"


def _aliases(client: MlflowClient, model: str) -> dict[str, str]:
    try:
        return {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}
    except MlflowException:
        raise NotFound(f"no registered model {model!r} in this registry") from None


def _version(client: MlflowClient, model: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(model, str(version))
    except MlflowException:
        raise NotFound(f"model {model!r} has no version {version}") from None


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def model_names(client: MlflowClient, only: Iterable[str] | None = None) -> list[str]:
    """The registered models to show: ``only`` if given, else every registered model."""
    if only:
        return list(only)
    return sorted(m.name for m in client.search_registered_models())


def queue_view(client: MlflowClient, models: Iterable[str], cfg: RegistryConfig) -> list[dict[str, Any]]:
    """Per model: the champion and the candidates awaiting review (alias ``challenger`` or status pending)."""
    out = []
    for model in models:
        aliases = _aliases(client, model)
        versions = sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version),
                          reverse=True)
        by_alias: dict[str, list[str]] = {}
        for a, v in aliases.items():
            by_alias.setdefault(v, []).append(a)
        champion = aliases.get(cfg.champion_alias)
        champ_recall = None
        rows = []
        for mv in versions:
            tags = dict(mv.tags)
            if str(mv.version) == champion:
                champ_recall = _num(tags.get(T.MACRO_RECALL))
        for mv in versions:
            tags, v = dict(mv.tags), str(mv.version)
            is_challenger = aliases.get(cfg.challenger_alias) == v
            pending = tags.get(T.REVIEW_STATUS) == _PENDING and tags.get(T.GATES_PASSED) == "true"
            if not (is_challenger or pending) or v == champion:
                continue
            recall = _num(tags.get(T.MACRO_RECALL))
            rows.append({"version": v, "aliases": sorted(by_alias.get(v, [])), "macro_recall": recall,
                         "delta": None if recall is None or champ_recall is None else recall - champ_recall,
                         "review_status": tags.get(T.REVIEW_STATUS, "unknown"),
                         "registered_by": tags.get(T.REGISTERED_BY, "?"),
                         "created": int(mv.creation_timestamp), "challenger": is_challenger})
        out.append({"model": model, "champion": champion, "champion_recall": champ_recall, "candidates": rows})
    return out


# ------------------------------------------------------------------------------------------------ evidence
def _evidence(client: MlflowClient, run_id: str | None) -> dict[str, Any]:
    """Read one run's review evidence (missing pieces are ``None`` / empty, never an error)."""
    ev: dict[str, Any] = {"metrics": None, "gates": None, "dataset": None, "validation": None, "misses": [],
                          "config": None, "has_report": False}
    if not run_id:
        return ev
    with tempfile.TemporaryDirectory(prefix="defectops-review-") as tmp:
        for path in ("metrics.json", "evidence"):
            try:
                client.download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                continue
        root = Path(tmp)

        def js(rel: str) -> Any:
            p = root / rel
            try:
                return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
            except (OSError, json.JSONDecodeError):
                return None

        ev["metrics"], ev["gates"] = js("metrics.json"), js("evidence/gates.json")
        ev["dataset"], ev["validation"] = js("evidence/dataset.json"), js("evidence/validation.json")
        ev["has_report"] = (root / "evidence" / "report.html").is_file()
        cfg = root / "evidence" / "config.yaml"
        ev["config"] = cfg.read_text(encoding="utf-8") if cfg.is_file() else None
        for item in js("evidence/misses/index.json") or []:
            png = root / "evidence" / "misses" / Path(str(item.get("file", ""))).name
            if png.is_file() and png.suffix == ".png":
                ev["misses"].append({**item, "uri": "data:image/png;base64," + base64.b64encode(
                    png.read_bytes()).decode("ascii")})
    return ev


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _intervals(metrics: dict[str, Any] | None) -> ClassificationIntervals | None:
    return ClassificationIntervals.of_metrics_dict(metrics) if metrics else None


def _bounds(iv: Interval | None) -> str | None:
    """``[0.975, 0.994]`` or ``None`` (no interval, or an undefined one)."""
    return iv.format_bounds(4) if iv is not None and iv.defined else None


def interval_note(cand: dict[str, Any] | None) -> str | None:
    """The sentence under the headline numbers saying what the brackets are (``None`` without intervals)."""
    iv = _intervals(cand)
    if iv is None:
        return None
    text = f"Brackets: {100 * iv.confidence:g} % Wilson score intervals of the rates and recalls"
    if iv.macro_recall is not None and iv.macro_recall.defined:
        text += f"; macro recall: percentile bootstrap over {iv.macro_recall.n} {iv.macro_recall.unit}"
    return text + "."


def _class_rows(cand: dict[str, Any], champ: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    civ, hiv = _intervals(cand), _intervals(champ)
    for c in cand.get("classes", []):
        r = _num(cand["per_class_recall"].get(c))
        p = _num(cand["per_class_precision"].get(c))
        cr = _num(champ["per_class_recall"].get(c)) if champ else None
        cp = _num(champ["per_class_precision"].get(c)) if champ else None
        rows.append({"name": c, "good": c == cand.get("good_class"), "support": cand.get("support", {}).get(c),
                     "recall": r, "champ_recall": cr, "d_recall": _delta(r, cr),
                     "recall_interval": _bounds(civ.per_class_recall.get(c)) if civ else None,
                     "champ_recall_interval": _bounds(hiv.per_class_recall.get(c)) if hiv else None,
                     "precision": p, "champ_precision": cp, "d_precision": _delta(p, cp)})
    return rows


def _summary_rows(cand: dict[str, Any], champ: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    civ, hiv = _intervals(cand), _intervals(champ)

    def bounds(ivs: ClassificationIntervals | None, key: str) -> str | None:
        return _bounds(getattr(ivs, key)) if ivs is not None and hasattr(ivs, key) else None

    for key, label, higher_better in (("macro_recall", "macro recall", True),
                                      ("escape_rate", "escape rate (defects called good)", False),
                                      ("false_call_rate", "false-call rate (good still flagged)", False),
                                      ("accuracy", "accuracy", True), ("n", "test samples", None)):
        a, b = _num(cand.get(key)), _num(champ.get(key)) if champ else None
        rows.append({"key": key, "label": label, "value": a, "champ": b, "delta": _delta(a, b),
                     "higher_better": higher_better, "count": key == "n",
                     "interval": bounds(civ, key), "champ_interval": bounds(hiv, key)})
    return rows


def confusion_table(metrics: dict[str, Any]) -> dict[str, Any]:
    """Counts with a 0-5 shade per cell (row-normalised), true classes as rows, predictions as columns."""
    classes = list(metrics.get("classes", []))
    rows = []
    for i, (c, counts) in enumerate(zip(classes, metrics.get("confusion", []), strict=False)):
        total = sum(counts) or 1
        rows.append({"name": c, "cells": [{"n": int(n), "shade": min(5, math.ceil(5 * n / total)),
                                           "diag": i == j} for j, n in enumerate(counts)], "total": sum(counts)})
    return {"classes": classes, "rows": rows}


def _ci(d: dict[str, Any] | None) -> tuple[str, str]:
    """An interval record (``Interval.to_dict``) as (point, "[low, high]")."""
    if not d or d.get("point") is None:
        return "n/a", ""
    return f"{d['point']:.3f}", f"[{d['low']:.3f}, {d['high']:.3f}]"


def anomaly_view(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """An anomaly model's judgement for the candidate page (``metrics.json``'s ``anomaly`` record): image and pixel
    AUROC of val and test, the threshold and how it was chosen, the score normalisation and, on board pairs, the
    boxes from maps. None for a classifier."""
    doc = (metrics or {}).get("anomaly")
    if not doc:
        return None
    thr, norm = doc["threshold"], doc["normalization"]
    rows = []
    for split in ("val", "test"):
        d = doc.get(split) or {}
        point, bounds = _ci(d.get("image_auroc"))
        pixel = d.get("pixel_auroc")
        rows.append({"split": split, "auroc": point, "interval": bounds, "n_good": d.get("n_good"),
                     "n_defect": d.get("n_defect"), "pixel": "n/a" if pixel is None else f"{pixel:.4f}"})
    boxes = doc.get("boxes") or {}
    box_rows = []
    if "map_threshold" in boxes:
        for split in ("val", "test"):
            b = boxes[split]
            box_rows.append({"split": split, "recall": _ci(b["recall"]), "precision": _ci(b["precision"]),
                             "fscore": f"{b['deeppcb']['fscore']:.3f}", "map": f"{b['deeppcb']['map']:.3f}",
                             "defects": b["n_gt"], "boards": b["n_images"]})
    return {"threshold": f"{thr['value']:.5g}", "rule": thr["rule"], "target": thr["target"],
            "val_false_call_rate": thr.get("val_false_call_rate"), "note": thr.get("note") or "",
            "normalization": norm["version"], "scale": f"{norm['scale']:.4g}", "rows": rows, "boxes": box_rows,
            "map_threshold": f"{boxes['map_threshold']['value']:.5g}" if box_rows else None,
            "box_note": boxes.get("note")}


def candidate_view(client: MlflowClient, model: str, version: str, cfg: RegistryConfig) -> dict[str, Any]:
    """Everything the candidate page shows, with the champion's numbers beside the candidate's."""
    aliases = _aliases(client, model)
    mv = _version(client, model, version)
    champion = aliases.get(cfg.champion_alias)
    cand = _evidence(client, mv.run_id)
    champ_mv = _version(client, model, champion) if champion and champion != str(mv.version) else None
    champ = _evidence(client, champ_mv.run_id) if champ_mv else None
    cm, champ_metrics = cand["metrics"], champ["metrics"] if champ else None
    tags = dict(sorted(mv.tags.items()))
    try:
        params = dict(sorted(client.get_run(mv.run_id).data.params.items())) if mv.run_id else {}
    except MlflowException:
        params = {}
    status = tags.get(T.REVIEW_STATUS, "unknown")
    is_challenger = aliases.get(cfg.challenger_alias) == str(mv.version)
    return {
        "model": model, "version": str(mv.version), "champion": champion, "run_id": mv.run_id,
        "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
        "is_champion": champion == str(mv.version), "is_challenger": is_challenger,
        "decidable": is_challenger or status == _PENDING, "review_status": status,
        "registered_by": tags.get(T.REGISTERED_BY), "gates_passed": tags.get(T.GATES_PASSED) == "true",
        "gates": (cand["gates"] or {}).get("results", []), "gates_all_passed": (cand["gates"] or {}).get("passed"),
        "summary": _summary_rows(cm, champ_metrics) if cm else [],
        "interval_note": interval_note(cm), "anomaly": anomaly_view(cm),
        "classes": _class_rows(cm, champ_metrics) if cm else [],
        "confusion": confusion_table(cm) if cm else None,
        "champ_confusion": confusion_table(champ_metrics) if champ_metrics else None,
        "misses": cand["misses"], "dataset": cand["dataset"], "validation": cand["validation"],
        "champ_dataset": champ["dataset"] if champ else None, "config": cand["config"],
        "has_report": cand["has_report"],
        "fingerprint": tags.get(T.DATASET_FINGERPRINT),
        "champ_fingerprint": dict(champ_mv.tags).get(T.DATASET_FINGERPRINT) if champ_mv else None,
        "tags": {k: v for k, v in tags.items() if not k.startswith(T.AUDIT_PREFIX)}, "params": params,
        "decider_roles": DECIDER_ROLES,
    }


def report_html(client: MlflowClient, model: str, version: str) -> bytes | None:
    """The self-contained evaluation report the version's run logged, if any."""
    from defectops.registry.governance import read_artifact

    return read_artifact(client, _version(client, model, version).run_id, "evidence/report.html")


def history_view(client: MlflowClient, model: str, lock_dir: Path) -> dict[str, Any]:
    """The model's audit trail as stored in the registry, with its verification result."""
    _aliases(client, model)
    check = RegistryTrail(client, model, lock_dir).check()
    return {"model": model, "records": list(reversed(check.records)), "ok": check.ok, "problem": check.problem,
            "first_bad_seq": check.first_bad_seq, "location": check.location, "count": len(check.records)}
