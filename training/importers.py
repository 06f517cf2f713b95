"""Importers: index an existing dataset layout as snapshot manifest samples, reading the files in place.

:func:`import_folder` takes the usual layout of classification data such as solder-joint crops, one folder per class
(``root/normal/``, ``root/short/``, ``root/insufficient/`` ...), or the same layout pre-split
(``root/train/<class>/``, ``root/val/<class>/``, ``root/test/<class>/``). Nothing is copied: the manifest stores each
file's path relative to ``root`` and its SHA-256, and ``write_snapshot(..., files_root=root)`` makes the snapshot.
Validation (:func:`training.validation.validate_snapshot`) then decides which files are usable; the importer only
refuses layouts that cannot be a dataset (no class folder, an empty class, a missing ``good_class``).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pipelines.fsutil import sha256_file
from training.snapshot import SPLITS, assign_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir"})  # archive and NAS metadata, full of image-named thumbnails


class FolderImport(NamedTuple):
    """What :func:`import_folder` found; unpacks as ``samples, classes, ignored``."""

    samples: list[dict[str, Any]]
    classes: list[str]
    ignored: list[str]


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
                if _hidden(e.name):
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


def import_folder(root: Path, *, val: float, test: float, seed: int,
                  extensions: Sequence[str] = IMAGE_EXTENSIONS, good_class: str | None = None) -> FolderImport:
    """Index a folder-per-class dataset: ``(samples, classes, ignored)``.

    * ``samples``: one manifest entry per image, ``path`` relative to ``root`` (POSIX separators, the real on-disk
      name so that it always opens), ``sha256``, ``label`` (the class folder's name, NFC-normalised), ``split`` and
      ``source`` = ``"folder:<root name>"``. Images in nested sub-folders of a class folder belong to that class.
    * ``classes``: sorted class names, ``good_class`` first when given (``ValueError`` naming the folders found if it
      is not one of them).
    * ``ignored``: relative paths skipped (sorted): hidden files and folders (``.name``, ``__MACOSX``, ``@eaDir``),
      files without an image extension (case-insensitive), files outside any class folder, broken symlinks and
      repeated symlinked folders. Folders end with ``/``. Also logged.

    Splits: if ``root`` holds split folders (``train``, ``val``/``valid``/``validation``, ``test``, any case) each
    holding class folders, their split is used; otherwise ``assign_split(key, val, test, seed)`` with the key the
    NFC-normalised relative path, so a file keeps its split whatever else is added and wherever the folder is copied.

    ``ValueError`` for a root with no class folder, a class without images (in the pre-split layout: without
    training images), split folders mixed with class folders, two class folders whose names differ only by Unicode
    normalisation, and names that are not UTF-8; ``FileNotFoundError`` if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: pass a folder holding one sub-folder per class")
    if not (val >= 0 and test >= 0 and val + test < 1):
        raise ValueError(f"split fractions val={val}, test={test} are invalid: use val >= 0, test >= 0, val + test < 1")
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

    source = f"folder:{root.resolve().name}"
    samples: list[dict[str, Any]] = []
    folder_of: dict[tuple[str | None, str], str] = {}
    total: Counter[str] = Counter()
    train: Counter[str] = Counter()
    for split, folder in groups:
        label = _class_name(folder.rsplit("/", 1)[-1], root)
        first = folder_of.setdefault((split, label), folder)
        if first != folder:
            raise ValueError(f"class folders {first!r} and {folder!r} of {root} have the same name up to Unicode "
                             "normalisation: merge them")
        for rel in walker.images(folder):
            key = unicodedata.normalize("NFC", rel)
            split_of = split or assign_split(key, val, test, seed)
            samples.append({"path": rel, "sha256": sha256_file(root / rel), "label": label, "split": split_of,
                            "source": source})
            total[label] += 1
            train[label] += split_of == "train"
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
    ignored = sorted(walker.ignored)
    if ignored:
        stray = [p for p in ignored if os.path.splitext(p)[1].lower() in exts]
        (log.warning if stray else log.info)(
            "import_folder %s: ignored %d entries (hidden, not an image, or outside a class folder)%s: %s",
            root, len(ignored), f", {len(stray)} of them images" if stray else "", ", ".join(ignored[:5]))
    samples.sort(key=lambda s: s["path"])
    split_names = ", ".join(f"{s}={sum(1 for x in samples if x['split'] == s)}" for s in SPLITS)
    log.info("import_folder %s: %d images, %d classes (%s)", root, len(samples), len(classes), split_names)
    return FolderImport(samples, classes, ignored)
