"""Image files of any common kind turned into the square 8-bit RGB inputs a classifier trains on and predicts from.

Folder-per-class datasets (solder-joint crops, component photos ...) arrive as PNG, JPEG, TIFF or BMP files of any
size, bit depth and channel layout. Every image goes through :func:`load_image` (one decoding rule) and
:func:`fit_to_square` (one geometry rule): :func:`build_image_crops` writes the results as lossless PNG training crops
and :func:`preprocess_for_model` hands the same pixels to batch prediction, so a model sees exactly the same input in
training and in use.

Decoding rules (:func:`load_image`):

* The header is read first (PIL reads no pixel data to report the size): an image over ``max_pixels`` is refused
  before it is decoded, which guards against decompression bombs.
* Pixels are decoded by OpenCV as stored. 16-bit samples are scaled to 8 bit over the full 16-bit range
  (``round(v / 257)``), never by per-image min/max, so an intensity means the same in every image; 12-bit sensor data
  in a 16-bit container therefore looks dark (convert such data to 8 bit beforehand if that matters). Grayscale is
  repeated into three channels, palette images are expanded, and alpha is discarded without compositing (as
  ``cv2.IMREAD_COLOR`` does). Float or 32-bit integer samples are refused.
* EXIF orientation is ignored: pixels are used as stored. Inspection cameras have a fixed geometry, and a tag that one
  reader applies and another does not is a classic train/serve skew.
* Missing, empty, corrupt, truncated (including a JPEG that lacks its end-of-image marker) or unsupported files raise
  :class:`ImageError`, a ``ValueError`` naming the file.

Geometry (:func:`fit_to_square`): ``resize`` stretches to the square, ``letterbox`` keeps the aspect ratio and pads
with black (0), ``center_crop`` keeps the aspect ratio and cuts the central square. Padding is black rather than a
replicated edge because edge replication draws streaks that can look like bridges or smears; black is also what the
training augmentation fills with. Shrinking uses ``INTER_AREA`` (no aliasing), enlarging ``INTER_LINEAR``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from defectops.training.snapshot import SPLITS, Snapshot, write_snapshot

FIT_MODES = ("resize", "letterbox", "center_crop")
DEFAULT_MAX_PIXELS = 4096 * 4096

_JPEG_STANDALONE = frozenset({0x00, 0x01, *range(0xD0, 0xD8)})  # stuffed FF00, TEM and RSTn: no length field


class ImageError(ValueError):
    """An image file that cannot be used; ``reason`` is the message without the path (for validation reports)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"image {path} {reason}")
        self.path = Path(path)
        self.reason = reason


def jpeg_is_truncated(data: bytes) -> bool:
    """True when ``data`` starts like a JPEG but ends before its end-of-image marker.

    Walks the marker segments (skipping each by its length, so an embedded EXIF thumbnail's markers are never
    mistaken for the image's own) and the entropy-coded data after each start-of-scan; bytes after the end-of-image
    marker (camera trailers) are allowed. Non-JPEG data gives False.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return False
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < n - 1 and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos < 0 or pos + 1 >= n:
            return True
        marker = data[pos + 1]
        if marker == 0xD9:
            return False
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return True
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if pos > n:
            return True
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker that is not FF00 or RSTn
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return True
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    pos += 2
                elif nxt == 0xFF:
                    pos += 1
                else:
                    break


def image_size(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the file header alone; :class:`ImageError` if unreadable or over ``max_pixels``."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "is empty (zero bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"is a decompression bomb (its header claims over {Image.MAX_IMAGE_PIXELS} "
                               "pixels)") from None
    except FileNotFoundError:
        raise ImageError(path, "does not exist") from None
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        detail = e.strerror or type(e).__name__
        raise ImageError(path, f"is not a readable image ({detail})") from None
    if w * h > max_pixels:
        raise ImageError(path, f"is {w}x{h}, over max_pixels={max_pixels} (decompression-bomb guard): raise "
                               "max_pixels if the image is genuine")
    return w, h


def image_metadata(paths: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    """Per-file metadata a model could use instead of the pixels, from headers only (no pixel data is decoded).

    Columns: ``width``, ``height``, ``aspect`` (width / height), ``bytes`` (file size) and one-hot ``format=<PIL
    format>`` and ``mode=<PIL mode>`` (channels and bit depth, e.g. ``L``, ``RGB``, ``I;16``) for the values seen.
    For :func:`evaluation.shortcut.shortcut_check`; :class:`ImageError` for a file whose header cannot be read.
    """
    rows: list[tuple[int, int, int, str, str]] = []
    for p in paths:
        p = Path(p)
        try:
            size = p.stat().st_size
            with Image.open(p) as im:
                w, h = im.size
                rows.append((w, h, size, str(im.format), str(im.mode)))
        except OSError as e:
            raise ImageError(p, f"is not a readable image ({e.strerror or type(e).__name__})") from None
    formats = sorted({r[3] for r in rows})
    modes = sorted({r[4] for r in rows})
    names = ["width", "height", "aspect", "bytes", *(f"format={f}" for f in formats), *(f"mode={m}" for m in modes)]
    out = np.zeros((len(rows), len(names)), np.float64)
    for i, (w, h, size, fmt, mode) in enumerate(rows):
        out[i, :4] = (w, h, w / h if h else 0.0, size)
        out[i, 4 + formats.index(fmt)] = 1.0
        out[i, 4 + len(formats) + modes.index(mode)] = 1.0
    return out, names


def _to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
    elif arr.dtype != np.uint8:
        raise ImageError(path, f"has {arr.dtype} samples: convert it to 8- or 16-bit integers")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return np.ascontiguousarray(np.repeat(arr[:, :, :1], 3, axis=2))
    if channels in (3, 4):  # BGR, BGRA -> RGB
        return np.ascontiguousarray(arr[:, :, 2::-1])
    raise ImageError(path, f"has {channels} channels: expected 1 (gray), 3 (colour) or 2/4 (with alpha)")


def load_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into a uint8 ``(H, W, 3)`` RGB array (rules in the module docstring); ImageError if unusable."""
    path = Path(path)
    w, h = image_size(path, max_pixels=max_pixels)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if jpeg_is_truncated(data):
        raise ImageError(path, "is a truncated JPEG (no end-of-image marker)")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # UNCHANGED also ignores EXIF rotation
    if arr is None or arr.size == 0:
        raise ImageError(path, "is corrupt or truncated (cannot be decoded)")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageError(path, f"decodes to {arr.shape[1]}x{arr.shape[0]} although its header says {w}x{h}, over "
                               f"max_pixels={max_pixels}")
    return _to_rgb8(arr, path)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    if (iw, ih) == (w, h):
        return img.copy()
    interp = cv2.INTER_AREA if w < iw or h < ih else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interp)
    return out.reshape(h, w, *img.shape[2:])  # cv2 drops a trailing channel axis of size 1


def fit_to_square(img: np.ndarray, size: int, mode: str = "letterbox") -> np.ndarray:
    """Fit an ``(H, W)`` or ``(H, W, C)`` image into ``size x size`` (same dtype and channels); modes in FIT_MODES.

    ``letterbox`` scales the longer side to ``size`` and centres the result on black (0) padding; ``center_crop``
    takes the central square of side ``min(H, W)`` and scales it; ``resize`` stretches. See the module docstring.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode {mode!r} is unknown: use one of {', '.join(FIT_MODES)}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size {size!r} is not a positive number of pixels")
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image of shape {img.shape} is not a non-empty (H, W) or (H, W, C) array")
    h, w = img.shape[:2]
    if mode == "resize":
        return _resize(img, size, size)
    if mode == "center_crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return _resize(img[y0:y0 + side, x0:x0 + side], size, size)
    scale = size / max(h, w)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    out = np.zeros((size, size, *img.shape[2:]), img.dtype)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = _resize(img, nw, nh)
    return out


def square_image(path: Path, size: int, mode: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``fit_to_square(load_image(path))``: the exact uint8 ``(size, size, 3)`` RGB pixels a model sees."""
    return fit_to_square(load_image(path, max_pixels=max_pixels), size, mode)


def resized_image(path: Path, height: int, width: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The uint8 ``(height, width, 3)`` RGB pixels an anomaly model sees: the whole image resized (area filter), the
    same in training, evaluation, drift checks and prediction."""
    return cv2.resize(load_image(path, max_pixels=max_pixels), (width, height), interpolation=cv2.INTER_AREA)


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 RGB image (what :func:`training.data.load_split` decodes back to ``img``)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode an image of shape {img.shape} as PNG")
    return buf.tobytes()


def build_image_crops(snap: Snapshot, accepted: Sequence[int], out_dir: Path, size: int, mode: str, *,
                      progress: Callable[[int], None] | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> Snapshot:
    """Write each accepted sample of an image snapshot as ``out_dir/crops/<split>/<index>.png`` and a crop snapshot.

    The crop snapshot has the fields :mod:`training.crops` writes (``path``, ``sha256``, ``label``, ``split``,
    ``source`` = the original relative path, ``origin`` = ``"image"``), so :func:`training.data.load_split` and the
    same training code read it. ``snapshot.json`` also records ``fit`` (``size`` and ``mode``), which prediction must
    reuse. Pass ``max_pixels`` = ``validation.max_image_pixels`` so that what validation accepted also loads here.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode {mode!r} is unknown: use one of {', '.join(FIT_MODES)}")
    out_dir = Path(out_dir)
    samples: list[dict[str, Any]] = []
    for i in accepted:
        s = snap.samples[i]
        split = s.get("split")
        if split not in SPLITS:
            raise ValueError(f"sample {i} ({s.get('path')!r}) has split {split!r}: use one of {', '.join(SPLITS)}")
        data = encode_png(square_image(snap.file(s["path"]), size, mode, max_pixels=max_pixels))
        rel = f"crops/{split}/{i}.png"
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        entry = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "label": s["label"], "split": split,
                 "source": s["path"], "origin": "image"}
        if s.get("group"):  # a duplicate group: resampled as one unit by the evaluation's bootstrap
            entry["group"] = s["group"]
        samples.append(entry)
        if progress:
            progress(1)
    return write_snapshot(out_dir, samples, snap.classes,
                          extra={"board_fingerprint": snap.fingerprint, "fit": {"size": size, "mode": mode}})


def preprocess_for_model(paths: Sequence[Path], size: int, mode: str, *,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``(N, 3, size, size)`` float32 in [0, 1] for batch prediction, bit-identical to the training crops.

    Same :func:`square_image` as :func:`build_image_crops`; PNG is lossless, so skipping the PNG round trip changes no
    pixel, and ``/ 255`` in float32 matches :func:`training.data.to_tensor`. ImageError names any unusable file.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode {mode!r} is unknown: use one of {', '.join(FIT_MODES)}")
    out = np.empty((len(paths), 3, size, size), np.float32)
    for k, p in enumerate(paths):
        out[k] = square_image(Path(p), size, mode, max_pixels=max_pixels).transpose(2, 0, 1)
    out /= np.float32(255.0)
    return out
