"""Importers: index an existing dataset layout as snapshot manifest samples, reading the files in place.

:func:`import_folder` takes the usual layout of classification data such as solder-joint crops, one folder per class
(``root/normal/``, ``root/short/``, ``root/insufficient/`` ...), or the same layout pre-split
(``root/train/<class>/``, ``root/val/<class>/``, ``root/test/<class>/``). Nothing is copied: the manifest stores each
file's path relative to ``root`` and its SHA-256, and ``write_snapshot(..., files_root=root)`` makes the snapshot.
Validation (:func:`training.validation.validate_snapshot`) then decides which files are usable; the importer only
refuses layouts that cannot be a dataset (no class folder, an empty class, a missing ``good_class``).

Duplicates are handled here, not left to fail validation: identical files form a group (by SHA-256) whose split is
drawn from the group's key, so a group never straddles two splits; copies within one class are kept once (the first
path in sorted order) and the others listed in :class:`Duplicates`; the same content under two labels is kept and
reported (validation quarantines every copy as a label conflict). Optionally near-identical images are grouped too
(:mod:`training.dedup`), kept, and kept in one split.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from defectops.core.fsutil import sha256_file
from defectops.training.config import DedupConfig
from defectops.training.snapshot import SPLITS, assign_split, escape_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir"})  # archive and NAS metadata, full of image-named thumbnails


@dataclass(frozen=True)
class Duplicates:
    """What :func:`import_folder` did with repeated content (written to ``data/duplicates.json`` by ``pull_data``).

    * ``dropped``: copies left out of the manifest, each ``{"path", "kept", "label", "sha256"}`` (``kept`` is the
      path that stays: the first in sorted order of that content in that class and split folder).
    * ``exact_groups``: contents found in more than one file.
    * ``groups``: the groups that still have several files in the manifest, each ``{"group", "kind", "paths",
      "labels", "splits"}``; ``kind`` is ``exact`` (one content) or ``near`` (several near-identical contents).
    * ``conflicts``: contents under more than one label, each ``{"sha256", "paths", "labels"}``; they stay in the
      manifest and validation quarantines every copy.
    * ``leaks``: contents in more than one split folder of a pre-split layout, each ``{"sha256", "paths",
      "splits"}``; validation quarantines all but the first as leakage.
    """

    dropped: list[dict[str, str]] = field(default_factory=list)
    exact_groups: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    leaks: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"dropped": len(self.dropped), "groups": self.exact_groups,
                "near_groups": sum(1 for g in self.groups if g["kind"] == "near"),
                "label_conflicts": len(self.conflicts), "leaks": len(self.leaks)}

    def summary(self) -> str:
        """One line for a terminal: ``duplicates: 5 copies dropped ...``."""
        c = self.counts()
        return (f"duplicates: {c['dropped']} copies dropped (kept once), {c['groups']} groups of identical files, "
                f"{c['near_groups']} near-duplicate groups, {c['label_conflicts']} label conflicts (same content "
                f"under two labels: quarantined by validation), {c['leaks']} contents in two split folders (leakage)")

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "dropped_files": self.dropped, "multi_file_groups": self.groups,
                "conflicts": self.conflicts, "leaks": self.leaks}


@dataclass(frozen=True)
class FolderImport:
    """What :func:`import_folder` found. Unpacks as ``samples, classes, ignored`` (and indexes like that tuple), as
    it did before ``duplicates`` was added."""

    samples: list[dict[str, Any]]
    classes: list[str]
    ignored: list[str]
    duplicates: Duplicates = field(default_factory=Duplicates)
    escaped: dict[str, str] = field(default_factory=dict)
    """Symlinks leading outside the root (path -> reason), never followed or opened: see :func:`import_folder`."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.samples, self.classes, self.ignored))

    def __getitem__(self, index: int | slice) -> Any:
        return (self.samples, self.classes, self.ignored)[index]

    def __len__(self) -> int:
        return 3


class _File(NamedTuple):
    rel: str
    label: str
    split: str | None  # the split folder's split, None when assigned by hash
    sha256: str  # "" for a symlink out of the root: never opened, left for validation to quarantine


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in JUNK_FOLDERS


def _printable(rel: str) -> str:
    """``rel`` with any undecodable bytes of a non-UTF-8 file name shown as escapes."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(name: str, where: Path) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"name '{_printable(name)}' in {where} is not valid UTF-8: rename it (the manifest stores "
                         "names as UTF-8)") from None
    return name


class _Walker:
    """Lists image files under class folders, recording everything it skips; symlinks are followed once each."""

    def __init__(self, root: Path, extensions: frozenset[str]) -> None:
        self.root = root
        self.extensions = extensions
        self.ignored: list[str] = []
        self.escaped: dict[str, str] = {}  # symlinks leading outside root, never followed: path -> reason
        self._seen: set[tuple[int, int]] = set()

    def entries(self, rel: str) -> tuple[list[str], list[str]]:
        """Visible sub-folders and files of ``root/rel`` (sorted); hidden entries go to ``ignored``."""
        folder = self.root / rel if rel else self.root
        st = folder.stat()
        if (st.st_dev, st.st_ino) in self._seen:
            self.ignored.append(_printable(f"{rel}/"))  # a symlink back to a folder already listed
            return [], []
        self._seen.add((st.st_dev, st.st_ino))
        dirs, files = [], []
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda e: e.name):
                sub = f"{rel}/{e.name}" if rel else e.name
                reason = escape_reason(self.root, sub) if e.is_symlink() else None
                if reason:  # checked from the link alone: what it points to is never stat'ed, listed or opened
                    self.escaped[sub] = reason
                elif _hidden(e.name):
                    self.ignored.append(_printable(sub + ("/" if e.is_dir() else "")))
                elif e.is_dir():
                    dirs.append(e.name)
                elif e.is_file():
                    files.append(e.name)
                else:  # broken symlink, socket, fifo ...
                    self.ignored.append(_printable(sub))
        return dirs, files

    def images(self, rel: str) -> list[str]:
        """Relative POSIX paths of every image under ``root/rel``, nested sub-folders included."""
        dirs, files = self.entries(rel)
        out = []
        for name in files:
            sub = f"{rel}/{name}"
            if os.path.splitext(name)[1].lower() in self.extensions:
                out.append(_utf8(sub, self.root))
            else:
                self.ignored.append(_printable(sub))
        for name in dirs:
            out += self.images(f"{rel}/{name}")
        return out


def _class_name(folder: str, root: Path) -> str:
    return unicodedata.normalize("NFC", _utf8(folder, root))


# One function on purpose (one pass over the class folders, split layouts and duplicates).
def import_folder(root: Path, *, val: float, test: float, seed: int,  # noqa: C901
                  extensions: Sequence[str] = IMAGE_EXTENSIONS, good_class: str | None = None,
                  dedup: DedupConfig | None = None) -> FolderImport:
    """Index a folder-per-class dataset: ``(samples, classes, ignored)`` and ``duplicates``.

    * ``samples``: one manifest entry per image, ``path`` relative to ``root`` (POSIX separators, the real on-disk
      name so that it always opens), ``sha256``, ``label`` (the class folder's name, NFC-normalised), ``split``,
      ``source`` = ``"folder:<root name>"`` and, for a sample of a group that keeps several files in the manifest,
      ``group`` = ``"dup-<16 hex digits of the group key>"``. Images in nested sub-folders of a class folder belong
      to that class. Copies of one content within one class (and split folder) are kept once: the first path in
      sorted order.
    * ``classes``: sorted class names, ``good_class`` first when given (``ValueError`` naming the folders found if it
      is not one of them).
    * ``ignored``: relative paths skipped (sorted): hidden files and folders (``.name``, ``__MACOSX``, ``@eaDir``),
      files without an image extension (case-insensitive), files outside any class folder, broken symlinks and
      repeated symlinked folders, and symlinks leading outside ``root`` that are not image samples. Folders end
      with ``/``. Also logged.
    * ``escaped``: every symlink found that leads outside ``root`` (to a file or a folder), path -> reason
      (``escapes the dataset root (symlink to /etc/passwd)``). Dataset roots are closed: such a link is never
      followed, listed or opened. One named like an image inside a class folder stays in ``samples`` without a
      ``sha256`` (and outside any duplicate group), so validation quarantines it with that reason like any other
      bad file; the others are ``ignored``. Logged as a warning. Symlinks that stay inside ``root`` are followed.
      A hard link to a file outside ``root`` cannot be told from a dataset file by its path and is read as one.
    * ``duplicates``: :class:`Duplicates`, what was dropped, grouped and found conflicting. Also logged.

    Splits: if ``root`` holds split folders (``train``, ``val``/``valid``/``validation``, ``test``, any case) each
    holding class folders, their split is used (identical content in two split folders is reported in
    ``duplicates.leaks``; validation quarantines it as leakage). Otherwise ``assign_split(key, val, test, seed)`` with
    the key the group's: the file's SHA-256, or with ``dedup.near`` the smallest SHA-256 of its near-duplicate group.
    So identical (and near-identical) files share a split, and a file keeps its split whatever else is added (with
    ``dedup.near``: unless a new file joins its group to another) and wherever the folder is copied.

    ``ValueError`` for a root with no class folder, a class without images (in the pre-split layout: without
    training images), split folders mixed with class folders, two class folders whose names differ only by Unicode
    normalisation, and names that are not UTF-8; ``FileNotFoundError`` if ``root`` is not a folder.
    """
    root = Path(root)
    dedup = dedup or DedupConfig()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: pass a folder holding one sub-folder per class")
    if not (val >= 0 and test >= 0 and val + test < 1):
        raise ValueError(f"split fractions val={val}, test={test} are invalid: use val >= 0, test >= 0, val + test < 1")
    if not 0 <= dedup.max_distance <= 64:
        raise ValueError(f"dedup.max_distance={dedup.max_distance} is not a number of bits: use 0 to 64 (4 is usual)")
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not exts:
        raise ValueError("extensions is empty: pass image extensions such as ('.png', '.jpg')")
    walker = _Walker(root, exts)
    top_dirs, top_files = walker.entries("")
    walker.ignored += [_printable(f) for f in top_files]
    split_dirs = [d for d in top_dirs if d.lower() in SPLIT_FOLDERS]
    groups: list[tuple[str | None, str]] = []  # (split or None when hashed, folder of one class relative to root)
    if split_dirs:
        others = [d for d in top_dirs if d.lower() not in SPLIT_FOLDERS]
        if others:
            raise ValueError(f"{root} mixes split folders {split_dirs} with other folders {others}: use either "
                             f"{root}/<class>/ or {root}/train|val|test/<class>/")
        by_split = Counter(SPLIT_FOLDERS[d.lower()] for d in split_dirs)
        if clash := [s for s, n in by_split.items() if n > 1]:
            raise ValueError(f"{root} has several folders for the {clash[0]} split ({split_dirs}): keep one")
        for d in split_dirs:
            class_dirs, files = walker.entries(d)
            walker.ignored += [_printable(f"{d}/{f}") for f in files]
            groups += [(SPLIT_FOLDERS[d.lower()], f"{d}/{c}") for c in class_dirs]
    else:
        groups = [(None, d) for d in top_dirs]
    if not groups:
        raise ValueError(f"{root} has no class folders: expected {root}/<class>/<images> or "
                         f"{root}/train|val|test/<class>/<images> ({len(walker.ignored)} other entries found)")

    found: list[_File] = []
    folder_of: dict[tuple[str | None, str], str] = {}
    total: Counter[str] = Counter()
    train: Counter[str] = Counter()
    for split, folder in groups:
        label = _class_name(folder.rsplit("/", 1)[-1], root)
        first = folder_of.setdefault((split, label), folder)
        if first != folder:
            raise ValueError(f"class folders {first!r} and {folder!r} of {root} have the same name up to Unicode "
                             "normalisation: merge them")
        escaped_before = set(walker.escaped)
        for rel in walker.images(folder):
            found.append(_File(rel, label, split, sha256_file(root / rel)))
            total[label] += 1
            train[label] += split in (None, "train")
        for rel in sorted(set(walker.escaped) - escaped_before):
            if os.path.splitext(rel)[1].lower() in exts:  # an image by name: a sample that validation quarantines
                found.append(_File(_utf8(rel, root), label, split, ""))
                total[label] += 1
                train[label] += split in (None, "train")
    for (_, label), folder in folder_of.items():
        if not total[label]:
            raise ValueError(f"class folder {root / folder} holds no images: add {'/'.join(sorted(exts))} files or "
                             "remove the folder")
        if split_dirs and not train[label]:
            raise ValueError(f"class {label!r} has no images under the train folder of {root}: add training images "
                             "or remove the class")

    classes = sorted({label for _, label in folder_of})
    if good_class is not None:
        good_class = unicodedata.normalize("NFC", good_class)
        if good_class not in classes:
            raise ValueError(f"good_class {good_class!r} is not a class folder of {root}: found {classes}")
        classes = [good_class, *(c for c in classes if c != good_class)]
    sampled = {f.rel for f in found if not f.sha256}
    walker.ignored += [_printable(p) for p in walker.escaped if p not in sampled]
    ignored = sorted(walker.ignored)
    if walker.escaped:
        log.warning("import_folder %s: %d symlinks lead outside the dataset root and are never opened (%d image "
                    "samples left for validation to quarantine, the rest ignored): %s", root, len(walker.escaped),
                    len(sampled), "; ".join(f"{_printable(p)}: {r}" for p, r in list(walker.escaped.items())[:5]))
    if ignored:
        stray = [p for p in ignored if os.path.splitext(p)[1].lower() in exts]
        (log.warning if stray else log.info)(
            "import_folder %s: ignored %d entries (hidden, not an image, or outside a class folder)%s: %s",
            root, len(ignored), f", {len(stray)} of them images" if stray else "", ", ".join(ignored[:5]))
    samples, duplicates = _deduplicate(found, root, val=val, test=test, seed=seed, dedup=dedup,
                                       source=f"folder:{root.resolve().name}")
    split_names = ", ".join(f"{s}={sum(1 for x in samples if x['split'] == s)}" for s in SPLITS)
    log.info("import_folder %s: %d images, %d classes (%s)", root, len(samples), len(classes), split_names)
    c = duplicates.counts()
    if any(c.values()):
        (log.warning if c["label_conflicts"] or c["leaks"] else log.info)("import_folder %s: %s", root,
                                                                          duplicates.summary())
    return FolderImport(samples, classes, ignored, duplicates,
                        {_printable(p): r for p, r in sorted(walker.escaped.items())})


def _deduplicate(found: list[_File], root: Path, *, val: float, test: float, seed: int, dedup: DedupConfig,
                 source: str) -> tuple[list[dict[str, Any]], Duplicates]:
    """Manifest samples (sorted by path) of ``found`` with copies within a class dropped and splits drawn per group."""
    escaped = [f for f in found if not f.sha256]  # never opened: no content to group by
    found = sorted((f for f in found if f.sha256), key=lambda f: f.rel)
    kept: list[_File] = []
    dropped: list[dict[str, str]] = []
    first_of: dict[tuple[str | None, str, str], str] = {}
    for f in found:
        first = first_of.setdefault((f.split, f.label, f.sha256), f.rel)
        if first == f.rel:
            kept.append(f)
        else:
            dropped.append({"path": f.rel, "kept": first, "label": f.label, "sha256": f.sha256})
    copies = Counter(f.sha256 for f in found)

    by_content: dict[str, list[_File]] = defaultdict(list)
    for f in kept:
        by_content[f.sha256].append(f)
    key_of = {sha: sha for sha in by_content}
    if dedup.near:
        from defectops.training.dedup import image_phash, near_components

        hashed = [(sha, h) for sha, files in sorted(by_content.items())
                  if (h := image_phash(root / files[0].rel)) is not None]
        components: dict[int, list[str]] = defaultdict(list)
        for (sha, _), c in zip(hashed, near_components([h for _, h in hashed], dedup.max_distance), strict=True):
            components[c].append(sha)
        for shas in components.values():
            for sha in shas:
                key_of[sha] = min(shas)
    members: dict[str, list[_File]] = defaultdict(list)
    for f in kept:
        members[key_of[f.sha256]].append(f)

    split_of = {f.rel: f.split or assign_split(key_of[f.sha256], val, test, seed) for f in kept}
    samples: list[dict[str, Any]] = []
    for f in kept:
        sample: dict[str, Any] = {"path": f.rel, "sha256": f.sha256, "label": f.label, "split": split_of[f.rel],
                                  "source": source}
        if len(members[key_of[f.sha256]]) > 1:
            sample["group"] = f"dup-{key_of[f.sha256][:16]}"
        samples.append(sample)
    for f in escaped:
        samples.append({"path": f.rel, "label": f.label, "split": f.split or assign_split(f"path:{f.rel}", val, test,
                                                                                         seed), "source": source})
    samples.sort(key=lambda x: str(x["path"]))
    multi = [{"group": f"dup-{key[:16]}", "kind": "near" if len({f.sha256 for f in fs}) > 1 else "exact",
              "paths": [f.rel for f in fs], "labels": sorted({f.label for f in fs}),
              "splits": sorted({split_of[f.rel] for f in fs})}
             for key, fs in sorted(members.items()) if len(fs) > 1]
    conflicts = [{"sha256": sha, "paths": [f.rel for f in fs], "labels": sorted({f.label for f in fs})}
                 for sha, fs in sorted(by_content.items()) if len({f.label for f in fs}) > 1]
    leaks = [{"sha256": sha, "paths": [f.rel for f in fs], "splits": sorted({str(f.split) for f in fs})}
             for sha, fs in sorted(by_content.items()) if len({f.split for f in fs}) > 1]
    return samples, Duplicates(dropped, sum(1 for n in copies.values() if n > 1), multi, conflicts, leaks)
