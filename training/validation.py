"""Snapshot validation: every sample is checked and either accepted or quarantined with a reason, never dropped
silently. Checks: paths escaping the snapshot root, missing, oversized, zero-byte, corrupt or truncated files
(including a JPEG without its end-of-image marker), decompression bombs (header dimensions are read before decoding),
checksum mismatches, template/tested size mismatch, unknown labels or splits, and the same content appearing in two
splits (leakage). Board pairs and single images (folder datasets, samples without ``template``) are both covered; an
image is accepted only if :func:`training.images.load_image` can decode it, so whatever passes can be trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.fsutil import sha256_file
from training.config import ValidationConfig
from training.images import ImageError, load_image
from training.snapshot import BOARD_LABEL, SPLITS, Snapshot


@dataclass(frozen=True)
class Quarantined:
    index: int
    path: str
    reason: str


@dataclass
class ValidationReport:
    total: int
    accepted: list[int] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return len(self.quarantined) / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "accepted": len(self.accepted), "bad_fraction": self.bad_fraction,
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
                except Exception as e:  # the header was fine: the data is damaged
                    return f"{path.name} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]})", digest
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"{path.name} looks like a decompression bomb", digest
    except Exception as e:  # PIL raises many types for broken files
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
    seen: dict[str, tuple[int, str]] = {}
    for i, s in enumerate(snap.samples):
        problem = _validate_sample(snap, s, cfg, known, seen, i)
        if problem:
            report.quarantined.append(Quarantined(i, str(s.get("path", "")), problem))
        else:
            report.accepted.append(i)
        if progress:
            progress(1)
    return report


def _validate_sample(snap: Snapshot, s: dict[str, Any], cfg: ValidationConfig, known: set[str],
                     seen: dict[str, tuple[int, str]], i: int) -> str | None:
    rels = [s.get("path", "")] + ([s["template"]] if "template" in s else [])
    for rel in rels:
        if not isinstance(rel, str) or not _safe_rel(rel):
            return f"path {rel!r} escapes the snapshot root"
    label = s.get("label")
    if label != BOARD_LABEL and label not in known:
        return f"unknown label {label!r}"
    if s.get("split") not in SPLITS:
        return f"unknown split {s.get('split')!r} (expected one of {', '.join(SPLITS)})"
    for box in s.get("boxes", []) or []:
        if len(box) != 5 or box[4] not in known:
            return f"box {box!r} has an unknown label or wrong shape"
        x1, y1, x2, y2 = box[:4]
        if not (x1 <= x2 and y1 <= y2):
            return f"box {box!r} has its corners swapped"
    shapes = []
    digests = []
    for rel, key in zip(rels, ("sha256", "template_sha256"), strict=False):
        problem, digest = check_image(snap.file(rel), cfg, s.get(key))
        if problem:
            return problem
        digests.append(digest)
        with Image.open(snap.file(rel)) as im:
            shapes.append(im.size)
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        return f"template is {shapes[1]} but tested image is {shapes[0]}"
    key = digests[0]
    if key in seen:
        j, split = seen[key]
        where = "across splits (leakage)" if split != s.get("split") else "within the split"
        return f"duplicate of sample {j} {where}"
    seen[key] = (i, str(s.get("split")))
    return None

