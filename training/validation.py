"""Snapshot validation: every sample is checked and either accepted or quarantined with a reason, never dropped
silently. Checks: paths escaping the snapshot root, missing, oversized, zero-byte, corrupt or truncated files
(including a JPEG without its end-of-image marker), decompression bombs (header dimensions are read before decoding),
checksum mismatches, template/tested size mismatch, unknown labels or splits, the same content appearing in two
splits (leakage) or twice in one split, and the same content under two labels (a label conflict: every copy is
quarantined, since which label is right is a question for whoever labelled it). Board pairs and single images
(folder datasets, samples without ``template``) are both covered; an image is accepted only if
:func:`training.images.load_image` can decode it, so whatever passes can be trained on.

Each quarantined sample has a ``kind``: ``conflict`` (label conflict), ``leakage``, ``duplicate`` (twice in one
split: the folder importer keeps such copies once, so this comes from snapshots built elsewhere) or ``invalid``.
Conflicts are counted apart from the rest (:attr:`ValidationReport.conflict_fraction` against
``max_conflict_fraction``, :attr:`ValidationReport.bad_fraction` against ``max_bad_fraction``); see
:class:`training.config.ValidationConfig` for why.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from defectops.core.fsutil import sha256_file
from defectops.training.config import ValidationConfig
from defectops.training.images import ImageError, load_image
from defectops.training.snapshot import BOARD_LABEL, SPLITS, Snapshot

CONFLICT, LEAKAGE, DUPLICATE, INVALID = "conflict", "leakage", "duplicate", "invalid"


@dataclass(frozen=True)
class Quarantined:
    index: int
    path: str
    reason: str
    kind: str = INVALID


@dataclass
class ValidationReport:
    total: int
    accepted: list[int] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for q in self.quarantined if q.kind == kind)

    @property
    def bad_fraction(self) -> float:
        """Fraction quarantined for any reason but a label conflict."""
        return (len(self.quarantined) - self.count(CONFLICT)) / self.total if self.total else 0.0

    @property
    def conflict_fraction(self) -> float:
        """Fraction quarantined as label conflicts (every copy of a content found under two labels)."""
        return self.count(CONFLICT) / self.total if self.total else 0.0

    def summary(self) -> str:
        """``3 of 120 samples quarantined (2 label conflicts, 0 leakage, 0 duplicates, 1 invalid)``."""
        kinds = ", ".join(f"{self.count(k)} {name}" for k, name in (
            (CONFLICT, "label conflicts"), (LEAKAGE, "leakage"), (DUPLICATE, "duplicates"), (INVALID, "invalid")))
        return f"{len(self.quarantined)} of {self.total} samples quarantined ({kinds})"

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "accepted": len(self.accepted), "bad_fraction": self.bad_fraction,
                "conflict_fraction": self.conflict_fraction, "label_conflicts": self.count(CONFLICT),
                "leakage": self.count(LEAKAGE), "duplicates": self.count(DUPLICATE),
                "quarantined": [asdict(q) for q in self.quarantined]}


def _safe_rel(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def check_image(path: Path, cfg: ValidationConfig, expected_sha: str | None = None) -> tuple[str | None, str]:
    """Return ``(problem or None, sha256)`` for one image file."""
    if not path.is_file():
        return f"missing file {path.name}", ""
    size = path.stat().st_size
    if size == 0:
        return f"zero-byte file {path.name}", ""
    if size > cfg.max_file_bytes:
        return f"file {path.name} is {size} bytes, over validation.max_file_bytes={cfg.max_file_bytes}", ""
    digest = sha256_file(path)
    if expected_sha and digest != expected_sha:
        return f"checksum mismatch for {path.name} (file changed since the snapshot was made)", digest
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > cfg.max_image_pixels:
                    return f"{path.name} is {w}x{h}, over validation.max_image_pixels={cfg.max_image_pixels}", digest
                try:
                    im.verify()
                except Exception as e:  # noqa: BLE001 - the header was fine: the data is damaged
                    return f"{path.name} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]})", digest
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"{path.name} looks like a decompression bomb", digest
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{path.name} is not a readable image ({type(e).__name__})", digest
    try:
        load_image(path, max_pixels=cfg.max_image_pixels)  # the decoder training uses: truncated JPEG, bit depth ...
    except ImageError as e:
        return f"{path.name} {e.reason}", digest
    return None, digest


def validate_snapshot(snap: Snapshot, cfg: ValidationConfig, *,
                      progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Validate every sample of ``snap``; pure of side effects besides reading the files."""
    known = set(snap.classes)
    report = ValidationReport(total=len(snap.samples))
    conflicts = _label_conflicts(snap.samples)
    seen: dict[str, tuple[int, str, str]] = {}
    for i, s in enumerate(snap.samples):
        found = _validate_sample(snap, s, cfg, known, seen, i, conflicts.get(i))
        if found:
            report.quarantined.append(Quarantined(i, str(s.get("path", "")), *found))
        else:
            report.accepted.append(i)
        if progress:
            progress(1)
    return report


def _label_conflicts(samples: Sequence[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    """For each sample whose content (manifest ``sha256``) also appears under another label: the first such other
    sample's path and label."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.get("sha256"):
            by_sha[str(s["sha256"])].append(i)
    out: dict[int, tuple[str, str]] = {}
    for members in by_sha.values():
        if len({samples[i].get("label") for i in members}) < 2:
            continue
        for i in members:
            j = next(j for j in members if samples[j].get("label") != samples[i].get("label"))
            out[i] = (str(samples[j].get("path", "")), str(samples[j].get("label")))
    return out


def _validate_sample(snap: Snapshot, s: dict[str, Any], cfg: ValidationConfig, known: set[str],
                     seen: dict[str, tuple[int, str, str]], i: int,
                     conflict: tuple[str, str] | None) -> tuple[str, str] | None:
    """``(reason, kind)`` if sample ``i`` is quarantined, else None (and its content is recorded in ``seen``)."""
    rels = [s.get("path", "")] + ([s["template"]] if "template" in s else [])
    for rel in rels:
        if not isinstance(rel, str) or not _safe_rel(rel):
            return f"path {rel!r} escapes the snapshot root", INVALID
    label = s.get("label")
    if label != BOARD_LABEL and label not in known:
        return f"unknown label {label!r}", INVALID
    if s.get("split") not in SPLITS:
        return f"unknown split {s.get('split')!r} (expected one of {', '.join(SPLITS)})", INVALID
    for box in s.get("boxes", []) or []:
        if len(box) != 5 or box[4] not in known:
            return f"box {box!r} has an unknown label or wrong shape", INVALID
        x1, y1, x2, y2 = box[:4]
        if not (x1 <= x2 and y1 <= y2):
            return f"box {box!r} has its corners swapped", INVALID
    shapes = []
    digests = []
    for rel, key in zip(rels, ("sha256", "template_sha256"), strict=False):
        problem, digest = check_image(snap.file(rel), cfg, s.get(key))
        if problem:
            return problem, INVALID
        digests.append(digest)
        with Image.open(snap.file(rel)) as im:
            shapes.append(im.size)
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        return f"template is {shapes[1]} but tested image is {shapes[0]}", INVALID
    if conflict:
        other, other_label = conflict
        return f"label conflict: same content as {other} labelled {other_label!r} (this copy: {label!r})", CONFLICT
    key = digests[0]
    if key in seen:
        j, path, split = seen[key]
        if split != s.get("split"):
            return f"duplicate of sample {j} ({path}, split {split}) across splits (leakage)", LEAKAGE
        return f"duplicate of sample {j} ({path}) within the split", DUPLICATE
    seen[key] = (i, str(s.get("path")), str(s.get("split")))
    return None

