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
``max_conflict_fraction``; the rest, :attr:`ValidationReport.bad`, against the bad-file budget of
:func:`bad_file_budget`); see :class:`training.config.ValidationConfig` for why.

Dataset roots are closed: a sample (or template) path that leads outside the snapshot's files root, through ``..``,
an absolute path or a symlink (to a file or to a folder) whose target lies outside, is quarantined with a reason such
as ``escapes the dataset root (symlink to /etc/passwd)`` and never opened or stat'ed beyond ``lstat``; symlinks that
stay inside the root are followed (:func:`training.snapshot.escape_reason`). A hard link to a file outside the root
cannot be told from a dataset file by its path and is not detected.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from defectops.core.fsutil import sha256_file
from defectops.training.config import ValidationConfig
from defectops.training.images import ImageError, load_image
from defectops.training.snapshot import BOARD_LABEL, SPLITS, Snapshot, escape_reason

CONFLICT, LEAKAGE, DUPLICATE, INVALID = "conflict", "leakage", "duplicate", "invalid"


@dataclass(frozen=True)
class Quarantined:
    index: int
    path: str
    reason: str
    kind: str = INVALID


def bad_file_budget(total: int, class_counts: Mapping[str, int], max_bad_fraction: float,
                    max_class_loss: float) -> int:
    """How many samples may be quarantined as bad (any kind but a label conflict) before validation fails.

    ``min(floor(max_bad_fraction * total), min over classes c of floor(max_class_loss * class_counts[c]))``, classes
    with no sample left out (and the class term left out when no class has a sample), never below 0. The second term
    bounds the total by what the *smallest* class can lose, so however the bad files fall, no class loses more than
    ``max_class_loss`` of its samples. With the defaults (0.01, 0.1): 1 bad file in 100 samples, 10 in 1,000 unless the
    smallest class has fewer than 100 samples; 0 when the smallest class has fewer than 10. A pure function;
    ``ValueError`` for fractions outside [0, 1] or negative counts.
    """
    if not (0.0 <= max_bad_fraction <= 1.0 and 0.0 <= max_class_loss <= 1.0):
        raise ValueError(f"max_bad_fraction={max_bad_fraction} and max_class_loss={max_class_loss} must lie in [0, 1]")
    if total < 0 or any(n < 0 for n in class_counts.values()):
        raise ValueError("sample counts cannot be negative")
    eps = 1e-9  # 0.29 * 100 is 28.999999999999996 in floating point
    budget = math.floor(max_bad_fraction * total + eps)
    sizes = [n for n in class_counts.values() if n > 0]
    if sizes:
        budget = min(budget, math.floor(max_class_loss * min(sizes) + eps))
    return max(0, budget)


def class_counts(snap: Snapshot) -> dict[str, int]:
    """Samples per class of the manifest (``label``; board pairs all count under ``board``); labels that are not
    classes (quarantined as unknown) are left out."""
    known = {*snap.classes, BOARD_LABEL}
    return dict(Counter(str(s.get("label")) for s in snap.samples if s.get("label") in known))


@dataclass
class ValidationReport:
    total: int
    accepted: list[int] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    budget: int | None = None
    """The bad-file budget (:func:`bad_file_budget`) the report is judged against; None: not computed."""
    budget_rule: str = ""
    """How ``budget`` was reached, for messages: ``min(1% of 300 samples, 10% of the smallest class 'short' (40))``."""

    def count(self, kind: str) -> int:
        return sum(1 for q in self.quarantined if q.kind == kind)

    @property
    def bad(self) -> int:
        """Samples quarantined for any reason but a label conflict."""
        return len(self.quarantined) - self.count(CONFLICT)

    @property
    def bad_fraction(self) -> float:
        """Fraction quarantined for any reason but a label conflict."""
        return self.bad / self.total if self.total else 0.0

    @property
    def over_budget(self) -> bool:
        """More bad samples than :attr:`budget` (False when no budget was computed)."""
        return self.budget is not None and self.bad > self.budget

    def budget_message(self, *, first_reason: bool = True) -> str:
        """One line: how many bad samples against which budget, and (``first_reason``) the first reason."""
        first = next((q for q in self.quarantined if q.kind != CONFLICT), None)
        head = (f"{self.bad} of {self.total} samples quarantined (label conflicts aside), "
                f"{'over' if self.over_budget else 'within'} the bad-file budget of {self.budget} ({self.budget_rule})")
        return head + (f"; first: {first.path}: {first.reason}" if first and first_reason else "")

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
                "leakage": self.count(LEAKAGE), "duplicates": self.count(DUPLICATE), "bad": self.bad,
                "bad_file_budget": self.budget, "bad_file_budget_rule": self.budget_rule,
                "over_budget": self.over_budget, "quarantined": [asdict(q) for q in self.quarantined]}


def check_image(path: Path, cfg: ValidationConfig, expected_sha: str | None = None, *,
                root: Path | None = None) -> tuple[str | None, str]:
    """Return ``(problem or None, sha256)`` for one image file. With ``root``, ``path`` must lie inside it
    (:func:`training.snapshot.escape_reason`), checked before anything but ``lstat`` touches the file."""
    if root is not None:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            return f"path {str(path)!r} escapes the dataset root (not under {root})", ""
        if reason := escape_reason(root, rel):
            return f"path {rel!r} {reason}", ""
    try:
        if not path.is_file():
            return f"missing file {path.name}", ""
        size = path.stat().st_size
    except OSError as e:
        return f"cannot read {path.name} ({type(e).__name__}: {e.strerror})", ""
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
    counts = class_counts(snap)
    report.budget = bad_file_budget(report.total, counts, cfg.max_bad_fraction, cfg.max_class_loss)
    smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0])) if counts else None
    report.budget_rule = (f"min of data.validation.max_bad_fraction={cfg.max_bad_fraction} of {report.total} samples"
                          + (f" and data.validation.max_class_loss={cfg.max_class_loss} of the smallest class "
                             f"{smallest[0]!r} ({smallest[1]} samples)" if smallest else ""))
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
    for rel in rels:  # before anything opens or stats the files
        if reason := escape_reason(snap.files_root, rel):
            return f"path {rel!r} {reason}", INVALID
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
        problem, digest = check_image(snap.file(rel), cfg, s.get(key), root=snap.files_root)
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

