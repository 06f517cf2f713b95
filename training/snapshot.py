"""Dataset snapshots: ``manifest.jsonl`` + ``classes.json`` + files, identified by a fingerprint.

One manifest line per sample: relative ``path`` (for board pairs, the tested image, with ``template`` beside it),
``sha256``, ``label``, ``split``, optional ``boxes`` (``[x1, y1, x2, y2, label]``), ``source`` and ``group`` (samples
that must stay together in one split and are reported together: a board design, a duplicate group; see
:func:`sample_group`). The fingerprint is
the SHA-256 of the canonical manifest (lines sorted, keys sorted) and the class list, so the same samples always give
the same fingerprint wherever the files live. ``snapshot.json`` records the fingerprint and the files' root (the
snapshot folder itself, or a dataset read in place).

Splits: per sample by a seeded hash (:func:`assign_split`), or by whole groups (:func:`assign_group_splits`) so that
val and test hold only board designs the model never trained on: a random split of boards puts boards of the training
designs into test, and its figures flatter what the model does on a new design.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from defectops.core.fsutil import read_json, sha256_file, write_json, write_text
from defectops.training.config import SplitConfig

MANIFEST = "manifest.jsonl"
CLASSES = "classes.json"
META = "snapshot.json"
BOARD_LABEL = "board"
SPLITS = ("train", "val", "test")
GROUP_BY = ("none", "design")


class PathEscapesRoot(ValueError):
    """A manifest path that leads outside its dataset root (``..``, an absolute path, or a symlink out)."""


def escape_reason(root: Path, rel: object) -> str | None:
    """Why ``root/rel`` is not inside ``root`` (both resolved, symlinks followed), or None when it is.

    Dataset roots are closed: a sample path that is absolute, holds ``..``, or passes through a symlink (the file
    itself or any folder on the way) whose target resolves outside ``root`` escapes; a symlink that stays inside
    ``root`` is fine. Only ``lstat`` and ``readlink`` are used: nothing the path leads to is opened. Reasons read
    ``escapes the dataset root (symlink to /etc/passwd)``.

    Limits: a *hard* link to a file outside the root is indistinguishable by path from a file of the dataset (it is
    the same inode under a second name), so it cannot be detected here; keep datasets on a file system the data's
    owners control. The check and a later open are not atomic: a symlink swapped in between is not seen.
    """
    if not isinstance(rel, str) or not rel:
        return f"path {rel!r} is not a relative file path"
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute():
        return "escapes the dataset root (absolute path)"
    if ".." in parts:
        return "escapes the dataset root ('..' in the path)"
    try:
        real_root = Path(root).resolve()
        cur = real_root
        for n, part in enumerate(parts, 1):
            cur = cur / part
            if cur.is_symlink():
                target = cur.resolve()
                if not target.is_relative_to(real_root):
                    where = "symlink" if n == len(parts) else f"{'/'.join(parts[:n])} is a symlink"
                    return f"escapes the dataset root ({where} to {target})"
                cur = target
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long ...
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return f"path cannot be resolved inside the dataset root ({type(e).__name__}: {detail[:120]})"
    return None


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` after checking that it stays inside ``root`` (:func:`escape_reason`); ``PathEscapesRoot``
    naming the path and the reason otherwise."""
    reason = escape_reason(root, rel)
    if reason:
        raise PathEscapesRoot(f"{rel!r} {reason}")
    return Path(root) / rel


@dataclass(frozen=True)
class Snapshot:
    """A snapshot on disk: where its manifest lives and where its files are read from."""

    dir: Path
    files_root: Path
    fingerprint: str
    classes: tuple[str, ...]
    samples: tuple[dict[str, Any], ...]

    def file(self, rel: str) -> Path:
        """``files_root / rel``; ``PathEscapesRoot`` when that leads outside ``files_root`` (``..``, an absolute path,
        a symlink out: :func:`escape_reason`), so no caller opens a file outside the dataset by accident."""
        return resolve_inside(self.files_root, rel)


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


def _names(groups: Iterable[str], limit: int = 20) -> str:
    names = sorted(groups)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _group_rank(seed: int, group: str) -> tuple[int, str]:
    return int.from_bytes(hashlib.sha256(f"{seed}:group:{group}".encode()).digest()[:8], "big"), group


def assign_group_splits(sizes: Mapping[str, int], val: float, test: float, seed: int,
                        val_groups: Iterable[str] = (), test_groups: Iterable[str] = ()) -> dict[str, str]:
    """Split of each group (``sizes``: group -> number of samples), whole groups only; a pure function of its inputs.

    Groups named in ``val_groups`` / ``test_groups`` go there first. The others, in the order of a seeded hash of
    their name, each go to test if that brings test's share of *samples* (pinned ones included) closer to ``test``,
    else to val if that brings val closer to ``val``, else to train; the last one goes to train if train has none
    yet. Then, when at least 3 groups were unpinned, a split with a fraction > 0 but no group gets the group nearest
    in size to its target (from train when train can spare one). ``ValueError`` for invalid fractions, unknown
    pinned names, a group pinned to both splits, or every group pinned (none left for training).
    """
    if not (val >= 0 and test >= 0 and val + test < 1):
        raise ValueError(f"split fractions val={val}, test={test} are invalid: use val >= 0, test >= 0, val + test < 1")
    pinned = {"val": set(val_groups), "test": set(test_groups)}
    for name, names in pinned.items():
        if unknown := names - set(sizes):
            raise ValueError(f"{name}_groups names unknown group(s) {_names(unknown)}; the groups found are "
                             f"{_names(sizes)}: use those names")
    if both := pinned["val"] & pinned["test"]:
        raise ValueError(f"group(s) {_names(both)} pinned to both val_groups and test_groups: pin each to one split")
    splits = {g: sp for sp, names in pinned.items() for g in names}
    free = sorted((g for g in sizes if g not in splits), key=lambda g: _group_rank(seed, g))
    if sizes and not free:
        raise ValueError(f"every group is pinned to val or test ({_names(sizes)}): leave at least one group for "
                         "training (remove it from val_groups / test_groups)")
    total = sum(sizes.values())
    target = {"test": test * total, "val": val * total}
    count = Counter({sp: sum(sizes[g] for g in names) for sp, names in pinned.items()})
    n_groups = Counter(splits.values())
    for i, g in enumerate(free):
        split = "train"
        if i < len(free) - 1 or n_groups["train"]:
            split = next((sp for sp in ("test", "val")
                          if abs(count[sp] + sizes[g] - target[sp]) < abs(count[sp] - target[sp])), "train")
        splits[g] = split
        count[split] += sizes[g]
        n_groups[split] += 1
    if len(free) >= 3:
        for sp, fraction in (("test", test), ("val", val)):
            if fraction <= 0 or n_groups[sp]:
                continue
            # 3+ free groups outside ``sp`` lie in two splits, so one of them holds 2 and can spare a group
            donor = next(d for d in ("train", "val", "test") if d != sp and n_groups[d] >= 2
                         and any(splits[g] == d for g in free))
            need = target[sp] - count[sp]
            g = min((g for g in free if splits[g] == donor), key=lambda g: (abs(sizes[g] - need), _group_rank(seed, g)))
            splits[g] = sp
            count[donor] -= sizes[g]
            count[sp] += sizes[g]
            n_groups[donor] -= 1
            n_groups[sp] += 1
    return {g: splits[g] for g in sorted(splits)}


def check_split_config(split: SplitConfig) -> None:
    """``ValueError`` for an unknown ``group_by`` or groups pinned while ``group_by`` is ``none``."""
    if split.group_by not in GROUP_BY:
        raise ValueError(f"data.split.group_by={split.group_by!r} is unknown: use {' or '.join(GROUP_BY)}")
    if split.group_by == "none" and (split.val_groups or split.test_groups):
        raise ValueError(f"data.split.val_groups / test_groups ({_names([*split.val_groups, *split.test_groups])}) "
                         "need whole groups: set data.split.group_by=design")


def assign_splits(samples: Sequence[dict[str, Any]], split: SplitConfig,
                  key: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Set each sample's ``split`` in place: per sample by :func:`assign_split` of ``key(sample)`` (default: its
    path) when ``split.group_by`` is ``none``; by whole :func:`sample_group` groups (:func:`assign_group_splits`)
    when it is ``design``."""
    check_split_config(split)
    if split.group_by == "none":
        key_of = key or (lambda s: str(s["path"]))
        for s in samples:
            s["split"] = assign_split(key_of(s), split.val, split.test, split.seed)
        return
    sizes = Counter(sample_group(s) for s in samples)
    of = assign_group_splits(sizes, split.val, split.test, split.seed, split.val_groups, split.test_groups)
    for s in samples:
        s["split"] = of[sample_group(s)]


def deeppcb_samples(root: Path, list_file: str, split: SplitConfig, *, source: str,
                    hash_files: bool = True) -> list[dict[str, Any]]:
    """Manifest entries for the pairs listed in a DeepPCB-format list file (``group/N/STEM.jpg group/N_not/STEM.txt``).

    Box labels are DeepPCB's type names; a missing or malformed annotation raises ``ValueError`` naming the file, as
    does an annotation or list file outside ``root``. A tested image or template leading outside ``root`` (``..``, a
    symlink out) is never opened: its pair is listed without that checksum and validation quarantines it with the
    reason (:func:`escape_reason`).
    Splits follow ``split`` (:func:`assign_splits`): per pair by a hash of the image name, or by board design (the
    list's first folder, ``groupNNNNN``).
    """
    from defectops.training.candidates import read_deeppcb_annotations

    check_split_config(split)
    root = Path(root)
    if reason := escape_reason(root, list_file):
        raise ValueError(f"list file {list_file!r} {reason}: keep it inside data.root")
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
        if reason := escape_reason(root, ann):
            raise ValueError(f"{list_path} line {n}: annotation {ann!r} {reason}")
        boxes = [[b.x1, b.y1, b.x2, b.y2, b.label] for b in read_deeppcb_annotations(root / ann)]
        entry: dict[str, Any] = {
            "path": tested, "template": template, "annotation": ann, "label": BOARD_LABEL, "boxes": boxes,
            "source": source,
        }
        if hash_files:
            for key, rel in (("sha256", tested), ("template_sha256", template)):
                if escape_reason(root, rel):
                    continue  # never opened: validation quarantines the pair with the reason
                p = root / rel
                if not p.is_file():
                    raise FileNotFoundError(f"{p} listed in {list_path} line {n} does not exist")
                entry[key] = sha256_file(p)
        samples.append(entry)
    if not samples:
        raise ValueError(f"{list_path} lists no image pairs")
    assign_splits(samples, split, key=lambda s: Path(s["path"]).name.removesuffix("_test.jpg"))
    return samples


def resampling_units(crops: Snapshot, paths: Sequence[str]) -> list[str]:
    """The resampling unit of each crop, for bootstrap intervals: the board it was cut from (``source`` is
    ``<board>#<k>`` for candidate crops), else its ``group`` when the manifest records one, else the crop itself.
    Units are ``<kind>:<id>`` strings (kind ``board``, ``group`` or ``crop``)."""
    by_path = {s["path"]: s for s in crops.samples}
    units = []
    for p in paths:
        s = by_path.get(p, {})
        source = str(s.get("source", ""))
        if s.get("origin") in ("candidate", "missed-gt") and "#" in source:
            units.append("board:" + source.rsplit("#", 1)[0])
        else:
            units.append(f"group:{s['group']}" if s.get("group") else "crop:" + p)
    return units
