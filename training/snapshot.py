"""Dataset snapshots: ``manifest.jsonl`` + ``classes.json`` + files, identified by a fingerprint.

One manifest line per sample: relative ``path`` (for board pairs, the tested image, with ``template`` beside it),
``sha256``, ``label``, ``split``, optional ``boxes`` (``[x1, y1, x2, y2, label]``), ``source`` and ``group`` (samples
that must stay together in one split and are reported together: a board design, a duplicate group; see
:func:`sample_group`). The fingerprint is
the SHA-256 of the canonical manifest (lines sorted, keys sorted) and the class list, so the same samples always give
the same fingerprint wherever the files live. ``snapshot.json`` records the fingerprint and the files' root (the
snapshot folder itself, or a dataset read in place).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.fsutil import read_json, sha256_file, write_json, write_text

MANIFEST = "manifest.jsonl"
CLASSES = "classes.json"
META = "snapshot.json"
BOARD_LABEL = "board"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Snapshot:
    """A snapshot on disk: where its manifest lives and where its files are read from."""

    dir: Path
    files_root: Path
    fingerprint: str
    classes: tuple[str, ...]
    samples: tuple[dict[str, Any], ...]

    def file(self, rel: str) -> Path:
        return self.files_root / rel


def canonical_manifest(samples: Iterable[dict[str, Any]]) -> str:
    lines = sorted(json.dumps(s, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for s in samples)
    return "\n".join(lines) + "\n"


def fingerprint(samples: Iterable[dict[str, Any]], classes: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(canonical_manifest(samples).encode())
    h.update(json.dumps(list(classes)).encode())
    return h.hexdigest()


def write_snapshot(dir: Path, samples: Sequence[dict[str, Any]], classes: Sequence[str], *,
                   files_root: Path | None = None, extra: dict[str, Any] | None = None) -> Snapshot:
    """Write manifest, classes and ``snapshot.json`` (last: its presence marks the snapshot complete)."""
    dir = Path(dir)
    fp = fingerprint(samples, classes)
    write_text(dir / MANIFEST, canonical_manifest(samples))
    write_json(dir / CLASSES, list(classes))
    root = Path(files_root).resolve() if files_root is not None else dir.resolve()
    meta = {"fingerprint": fp, "files_root": "." if root == dir.resolve() else str(root),
            "num_samples": len(samples), "classes": list(classes), **(extra or {})}
    write_json(dir / META, meta)
    return Snapshot(dir, root, fp, tuple(classes), tuple(samples))


def load_snapshot(dir: Path) -> Snapshot:
    """Read a complete snapshot; raises ``FileNotFoundError`` naming what is missing."""
    dir = Path(dir)
    for name in (META, MANIFEST, CLASSES):
        if not (dir / name).is_file():
            raise FileNotFoundError(f"snapshot {dir} is incomplete: {name} is missing")
    meta = read_json(dir / META)
    classes = tuple(read_json(dir / CLASSES))
    samples = []
    for i, line in enumerate((dir / MANIFEST).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{dir / MANIFEST} line {i} is not JSON ({e.msg})") from None
    root = dir if meta.get("files_root", ".") == "." else Path(meta["files_root"])
    return Snapshot(dir, root.resolve(), meta["fingerprint"], classes, tuple(samples))


def sample_group(sample: dict[str, Any]) -> str:
    """The group a sample belongs to: its ``group`` entry, else the first folder of its path (a DeepPCB board design
    such as ``group20085``, a class folder), else the path itself."""
    group = sample.get("group")
    if group:
        return str(group)
    path = str(sample.get("path", ""))
    return path.split("/", 1)[0] if "/" in path else path


def assign_split(key: str, val: float, test: float, seed: int) -> str:
    """Stable split for a sample key: depends on the key and seed only, never on order or dataset size."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def deeppcb_samples(root: Path, list_file: str, *, val: float, test: float, seed: int, source: str,
                    hash_files: bool = True) -> list[dict[str, Any]]:
    """Manifest entries for the pairs listed in a DeepPCB-format list file (``group/N/STEM.jpg group/N_not/STEM.txt``).

    Box labels are DeepPCB's type names; a missing or malformed annotation raises ``ValueError`` naming the file.
    """
    from training.candidates import read_deeppcb_annotations

    root = Path(root)
    list_path = root / list_file
    if not list_path.is_file():
        raise FileNotFoundError(f"list file {list_path} not found: set data.root to a DeepPCB-format folder "
                                f"and data.list_file to its list (e.g. trainval.txt)")
    samples = []
    for n, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{list_path} line {n}: expected 'IMAGE.jpg ANNOTATION.txt', got {line!r}")
        image, ann = parts
        stem = image[: -len(".jpg")] if image.endswith(".jpg") else image
        tested, template = f"{stem}_test.jpg", f"{stem}_temp.jpg"
        boxes = [[b.x1, b.y1, b.x2, b.y2, b.label] for b in read_deeppcb_annotations(root / ann)]
        entry: dict[str, Any] = {
            "path": tested, "template": template, "annotation": ann, "label": BOARD_LABEL, "boxes": boxes,
            "source": source,
            "split": assign_split(Path(stem).name, val, test, seed),
        }
        if hash_files:
            for key, rel in (("sha256", tested), ("template_sha256", template)):
                p = root / rel
                if not p.is_file():
                    raise FileNotFoundError(f"{p} listed in {list_path} line {n} does not exist")
                entry[key] = sha256_file(p)
        samples.append(entry)
    if not samples:
        raise ValueError(f"{list_path} lists no image pairs")
    return samples
