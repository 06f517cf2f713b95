"""Tests for evaluation.report: the HTML is self-contained, complete, escaped, fast and written atomically."""

from __future__ import annotations

import base64
import os
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from defectops.evaluation.gates import GateConfig, GateReport, evaluate_gates
from defectops.evaluation.metrics import ClassificationMetrics, PRCurve, classification_metrics, pr_curves
from defectops.evaluation.report import Miss, render_report

CLASSES = ("false_call", "open", "short", "mousebite", "spur", "copper", "pin-hole")
EVIL = "<script>alert(1)</script>"
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


class _Refs(HTMLParser):
    """Collects every src/href attribute and every tag name."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for key, value in attrs:
            if key == "src":
                self.srcs.append(value or "")
            elif key == "href":
                self.hrefs.append(value or "")


def _inputs(classes: tuple[str, ...], seed: int = 0) -> tuple[ClassificationMetrics, GateReport, dict[str, PRCurve]]:
    rng = np.random.default_rng(seed)
    n = 350
    y = rng.integers(0, len(classes), n)
    logits = rng.normal(0.0, 1.0, (n, len(classes)))
    logits[np.arange(n), y] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = classification_metrics(y, probs, classes, classes[0])
    gates = evaluate_gates(metrics, GateConfig(max_latency_ms=5.0), champion=metrics, latency_ms=2.5)
    return metrics, gates, pr_curves(y, probs, classes)


def _misses() -> list[Miss]:
    rgb = np.zeros((48, 48, 3), dtype=np.uint8)
    rgb[10:30, 20:28] = (220, 160, 40)
    grey = np.full((32, 40), 128, dtype=np.uint8)
    return [
        Miss(rgb, "open", "false_call", 0.91, caption="board A12 / crop 0042"),
        Miss(grey, "short", "spur", 0.66),
    ]


def _png_size(uri: str) -> tuple[int, int]:
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One full 7-class report; returns its HTML."""
    metrics, gates, curves = _inputs(CLASSES)
    path = tmp_path_factory.mktemp("report") / "report.html"
    out = render_report(
        path,
        title="Candidate v7",
        metrics=metrics,
        gates=gates,
        curves=curves,
        info={"run id": "abc123", "model": "resnet18", "dataset fingerprint": "sha256:feed"},
        misses=_misses(),
        sections=[("Notes", "<p><b>trusted</b> section body</p>")],
    )
    assert out == path
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind
    return path.read_text(encoding="utf-8")


def test_contains_sections_gates_and_classes(rendered: str) -> None:
    html = rendered
    for name in CLASSES:
        assert name in html
    for gate in (
        "macro_recall",
        "recall[open]",
        "escape_rate",
        "false_call_rate",
        "latency",
        "no_regression:macro_recall",
    ):
        assert gate in html
    for text in (
        "Release gates",
        "Confusion matrix",
        "Precision-recall curves",
        "Worst misses",
        "abc123",
        "sha256:feed",
    ):
        assert text in html
    assert "board A12 / crop 0042" in html
    assert "<b>trusted</b> section body" in html  # sections are inserted verbatim


def test_images_are_embedded_png(rendered: str) -> None:
    html = rendered
    refs = _Refs()
    refs.feed(html)
    assert len(refs.srcs) == 3 + 2  # three plots + two misses
    for src in refs.srcs:
        assert src.startswith("data:image/png;base64,")
        width, height = _png_size(src)
        assert width > 0
        assert height > 0
    assert _png_size(refs.srcs[-1]) == (40, 32)  # grey miss kept at native size


def test_no_external_resources_or_scripts(rendered: str) -> None:
    html = rendered
    refs = _Refs()
    refs.feed(html)
    assert all(h.startswith("#") for h in refs.hrefs)
    assert not refs.tags & {"script", "link", "iframe", "object", "embed"}
    text = DATA_URI.sub("", html)  # base64 payloads could contain "http" by chance
    assert "http" not in text
    assert "url(" not in text
    assert "@import" not in text


def test_malicious_names_are_escaped(tmp_path: Path) -> None:
    classes = ("false_call", EVIL, "cost $x$")  # "$...$" must not be parsed as matplotlib mathtext
    metrics, gates, curves = _inputs(classes, seed=1)
    miss = Miss(np.zeros((8, 8), dtype=np.uint8), EVIL, "false_call", 0.5, caption=EVIL)
    path = render_report(
        tmp_path / "evil.html",
        title=EVIL,
        metrics=metrics,
        gates=gates,
        curves=curves,
        info={EVIL: EVIL},
        misses=[miss],
        sections=[(EVIL, "<p>ok</p>")],
    )
    html = path.read_text(encoding="utf-8")
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "cost $x$" in html


def test_large_miss_image_is_downsampled(tmp_path: Path) -> None:
    metrics, gates, curves = _inputs(CLASSES[:3])
    big = np.zeros((1024, 600, 3), dtype=np.uint8)
    path = render_report(
        tmp_path / "r.html",
        title="t",
        metrics=metrics,
        gates=gates,
        curves=curves,
        info={},
        misses=[Miss(big, "open", "short", 0.7)],
    )
    refs = _Refs()
    refs.feed(path.read_text(encoding="utf-8"))
    width, height = _png_size(refs.srcs[-1])
    assert max(width, height) <= 256


def test_replaces_existing_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, gates, curves = _inputs(CLASSES[:3])
    path = tmp_path / "out" / "report.html"
    kwargs = {"title": "t", "metrics": metrics, "gates": gates, "curves": curves, "info": {}}
    render_report(path, **kwargs)  # creates the missing parent directory
    first = path.read_text(encoding="utf-8")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        render_report(path, **{**kwargs, "title": "second"})
    assert path.read_text(encoding="utf-8") == first  # old report untouched
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # temp file cleaned up


def test_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    metrics, gates, curves = _inputs(CLASSES[:3])
    render_report(tmp_path / "r.html", title="t", metrics=metrics, gates=gates, curves=curves, info={})
    assert matplotlib.get_backend() == backend
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    if pyplot is not None:
        assert pyplot.get_fignums() == []


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8, 2), dtype=np.uint8), np.zeros((0, 8), dtype=np.uint8)],
    ids=["float", "two-channels", "empty"],
)
def test_miss_rejects_bad_images(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"Miss\.image"):
        Miss(image, "open", "short", 0.5)


def test_intervals_next_to_headline_figures(tmp_path: Path) -> None:
    from defectops.evaluation.intervals import bootstrap_macro_recall, classification_intervals

    metrics, gates, curves = _inputs(CLASSES[:3])
    y = np.repeat(np.arange(3), [sum(r) for r in metrics.confusion])
    pred = np.concatenate([np.repeat(np.arange(3), r) for r in metrics.confusion])
    iv = classification_intervals(metrics, macro_recall=bootstrap_macro_recall(y, pred, 3, unit="boards"))
    note = "All figures are on the test split (350 crops). Brackets: 95 % Wilson score intervals."
    html = render_report(tmp_path / "r.html", title="t", metrics=metrics, gates=gates, curves=curves, info={},
                         intervals=iv, split_note=note).read_text(encoding="utf-8")
    for interval in (iv.macro_recall, iv.escape_rate, iv.false_call_rate, *iv.per_class_recall.values()):
        assert interval is not None and interval.defined
        assert interval.format_bounds(4) in html
    assert note in html
    plain = render_report(tmp_path / "p.html", title="t", metrics=metrics, gates=gates, curves=curves,
                          info={}).read_text(encoding="utf-8")
    assert "Interval</th>" not in plain and 'id="split-note"' not in plain
    assert iv.escape_rate.format_bounds(4) in plain  # the escape-rate gate's detail gives the interval anyway


def test_quarantined_samples_are_listed_with_their_reasons_escaped(tmp_path: Path) -> None:
    metrics, gates, curves = _inputs(("ok", "bad"))
    validation = {"total": 120, "bad": 1, "bad_file_budget": 1, "bad_file_budget_rule": "min of 1% and 10%",
                  "quarantined": [{"index": 7, "path": "short/<s7>.png", "kind": "invalid", "reason":
                                   "path 'short/<s7>.png' escapes the dataset root (symlink to /etc/passwd)"}]}
    html = render_report(tmp_path / "r.html", title="t", metrics=metrics, gates=gates, curves=curves, info={},
                         quarantine=validation).read_text()
    assert 'id="quarantine"' in html and "1 of 120 samples were left out" in html
    assert "escapes the dataset root (symlink to /etc/passwd)" in html and "short/&lt;s7&gt;.png" in html
    assert "<s7>" not in html
    plain = render_report(tmp_path / "p.html", title="t", metrics=metrics, gates=gates, curves=curves, info={},
                          quarantine={"total": 3, "quarantined": []}).read_text()
    assert 'id="quarantine"' not in plain
