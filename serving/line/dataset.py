"""The line's verified results as the next dataset snapshot (``defectops data import line``).

Only boards a repair station has verified become samples: every defect the model reported on the board has a
verdict (the latest one counts), and any defect it missed is added by the operator (``missed``). Then:

- **board models** (``aoi``): the tested image with its template (both kept by the service) and the boxes of the
  ``confirmed`` defects (the operator's corrected type where given) plus the missed ones; ``false_fail`` and
  ``accepted`` boxes are not defects (the candidate step proposes them again, and they train as false calls);
- **image models** (``folder``, ``anomaly``): the image labelled with the confirmed (or missed) defect's type, else
  with the model's good class.

Files are read in place from the store (``files_root``); each sample records where it came from (line, transaction,
unit, model version), and ``snapshot.json`` the lineage of the whole set: which models and versions judged the boards,
which lines, how many verdicts from which operators, and what was left out and why.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from defectops.core.taxonomy import DEFECT_TYPES
from defectops.serving.line.store import read_jsonl
from defectops.training.config import SplitConfig


def _latest_verdicts(records: list[dict[str, Any]]) -> dict[str, tuple[dict[int, dict[str, Any]], list[Any], set[str]]]:
    out: dict[str, tuple[dict[int, dict[str, Any]], list[Any], set[str]]] = {}
    for rec in records:
        per, missed, who = out.setdefault(rec["transaction_id"], ({}, [], set()))
        for v in rec.get("verdicts") or []:
            per[int(v["defect"])] = v
        missed.extend(rec.get("missed") or [])
        who.add(str(rec.get("operator") or ""))
    return out


def _image(board: Path, name: str) -> Path | None:
    found = sorted(board.glob(f"{name}.*"))
    return found[0] if found else None


def line_samples(root: Path, split: SplitConfig) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Samples, classes and lineage of the verified boards of the store at ``root``."""
    from defectops.core.fsutil import sha256_file
    from defectops.training.snapshot import BOARD_LABEL, assign_splits

    root = Path(root)
    results = {r["transaction_id"]: r for r in read_jsonl(root / "results.jsonl")}
    records = list(read_jsonl(root / "verdicts.jsonl"))
    skipped: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    labels: set[str] = set()
    good: set[str] = set()
    for txid, (per, missed, _) in _latest_verdicts(records).items():
        r = results.get(txid)
        if r is None:
            skipped["verdict without a result"] += 1
            continue
        if len(per) < len(r["defects"]):
            skipped["not every reported defect verified"] += 1
            continue
        task = r["model"]["task"]
        tested = root / r["image"]
        confirmed = [(r["defects"][i], v) for i, v in sorted(per.items()) if v["verdict"] == "confirmed"]
        common = {"sha256": sha256_file(tested), "source": f"line:{r['line_id']}:{txid}", "unit_id": r["unit_id"],
                  "model": f"{r['model']['name']}/{r['model']['version']}"}
        if task == "aoi":
            template = _image(tested.parent, "template")
            if template is None:
                skipped["board without its template"] += 1
                continue
            boxes = [[*d["box"], str(v.get("type") or d["type"])] for d, v in confirmed]
            boxes += [[*m["box"], str(m["type"])] for m in missed]
            labels.update(b[4] for b in boxes)
            samples.append({"path": str(tested.relative_to(root)), "template": str(template.relative_to(root)),
                            "template_sha256": sha256_file(template), "label": BOARD_LABEL, "boxes": boxes, **common})
        else:
            kinds = [str(v.get("type") or d["type"]) for d, v in confirmed] + [str(m["type"]) for m in missed]
            label = kinds[0] if kinds else str(r["model"].get("good_class") or "good")
            if not kinds:
                good.add(label)
            labels.add(label)
            samples.append({"path": str(tested.relative_to(root)), "label": label, **common})
    if not samples:
        raise ValueError(f"no verified board in {root}: post the repair station's verdicts (POST /v1/verdicts) first")
    assign_splits(samples, split, key=lambda s: str(s["unit_id"]))
    if any("template" in s for s in samples):
        if any("template" not in s for s in samples):
            raise ValueError(f"{root} mixes board and image models: import each model's results into its own store")
        classes = ["false_call", *DEFECT_TYPES, *sorted(labels - set(DEFECT_TYPES) - {"false_call"})]
    else:
        classes = [*sorted(good), *sorted(labels - good)]
    lineage = {"source": "line", "store": str(root.resolve()),
               "models": sorted({s["model"] for s in samples}),
               "lines": sorted({results[s["source"].rsplit(":", 1)[1]]["line_id"] for s in samples}),
               "verdict_records": len(records), "boards": len(samples),
               "operators": sorted({o for _, _, who in _latest_verdicts(records).values() for o in who if o}),
               "skipped": dict(skipped)}
    return samples, classes, lineage
