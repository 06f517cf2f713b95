"""Self-contained HTML report of a drift check (plots as inline PNGs, no scripts, written atomically).

Plots a person looks at: the image statistics (reference vs batch histograms, one panel per statistic and
channel), the pooled intensity histograms, the embeddings projected on the reference's first two principal
components, the prediction mix and the confidence distributions. Text is escaped by Jinja2 autoescaping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from defectops.evaluation.drift import HIST_BINS, DriftReport, Profile, pca_2d
from defectops.evaluation.report import _atomic_write_text, _mpl_text, _png_data_uri

__all__ = ["render_drift_report"]

_REF, _NEW = "#4c72b0", "#dd8452"

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#1f2328}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left}
th{background:#f6f8fa}.drift{color:#cf222e;font-weight:bold}.ok{color:#1a7f37;font-weight:bold}
.verdict{font-size:1.3em;padding:.6em 1em;border-radius:6px;display:inline-block}
.v-drift{background:#ffebe9}.v-ok{background:#dafbe1}img{max-width:100%}
</style></head><body>
<h1>{{ title }}</h1>
<p class="verdict {{ 'v-drift' if report.drifted else 'v-ok' }}">{{ report.summary() }}</p>
<table>{% for k, v in info %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<p>Decision rule: drift when any signal's p-value is below alpha / k = {{ '%g' % report.alpha }} / {{ k }}
= {{ '%.2e' % threshold }} (Bonferroni, so a batch from the reference's distribution raises a false alarm with
probability at most alpha); image statistics must also shift by PSI &ge; {{ report.settings.get('min_psi') }}.</p>
<h2>Signals</h2>
<table><thead><tr><th>signal</th><th>test</th><th>statistic</th><th>p-value</th><th>effect</th><th>result</th>
</tr></thead><tbody>
{% for s in report.signals %}<tr><td>{{ s.name }}</td><td>{{ s.test }}</td><td>{{ fmt(s.statistic) }}</td>
<td>{{ '%.2e' % s.p_value }}</td><td>{{ (s.effect_name ~ ' ' ~ fmt(s.effect)) if s.effect is not none else '-' }}</td>
<td class="{{ 'drift' if s.drifted else 'ok' }}">{{ 'DRIFT' if s.drifted else 'ok' }}</td></tr>{% endfor %}
</tbody></table>
{% for title, uri in plots %}<h2>{{ title }}</h2><img alt="{{ title }}" src="{{ uri }}">{% endfor %}
</body></html>
"""


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.4g}"


def _stats_plot(ref: Profile, new: Profile, report: DriftReport) -> str:
    names = ref.feature_names
    cols = len(ref.channels)
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.6 * rows))
    flagged = {s.name for s in report.drifted_signals}
    for j, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, j + 1)
        a, b = ref.features[:, j], new.features[:, j]
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30).tolist()
        ax.hist(a, bins=bins, density=True, alpha=0.55, color=_REF, label="reference")
        ax.hist(b, bins=bins, density=True, alpha=0.55, color=_NEW, label="batch")
        ax.set_title(_mpl_text(name), fontsize=9, color="#cf222e" if name in flagged else "black")
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png_data_uri(fig)


def _intensity_plot(ref: Profile, new: Profile, report: DriftReport) -> str:
    cols = len(ref.channels)
    fig = Figure(figsize=(4 * cols, 2.8))
    x = np.arange(HIST_BINS) * 16 + 8
    for i, ch in enumerate(ref.channels):
        ax = fig.add_subplot(1, cols, i + 1)
        ax.bar(x - 3, ref.histograms[:, i].mean(0), width=6, color=_REF, label="reference")
        ax.bar(x + 3, new.histograms[:, i].mean(0), width=6, color=_NEW, label="batch")
        ax.set_yscale("log")
        ax.set_title(_mpl_text(f"{ch}: PSI {report.histogram_psi.get(ch, float('nan')):.3f}"), fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png_data_uri(fig)


def _pca_plot(ref: Profile, new: Profile) -> str:
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    if len(ref.embeddings) >= 2 and len(new.embeddings):
        a, b = pca_2d(ref.embeddings, new.embeddings)
        ax.scatter(a[:, 0], a[:, 1], s=8, alpha=0.5, color=_REF, label="reference")
        ax.scatter(b[:, 0], b[:, 1], s=8, alpha=0.5, color=_NEW, label="batch")
        ax.legend(fontsize=8)
    ax.set_xlabel("PC 1 (reference)")
    ax.set_ylabel("PC 2 (reference)")
    fig.tight_layout()
    return _png_data_uri(fig)


def _mix_plot(ref: Profile, new: Profile) -> str:
    fig = Figure(figsize=(max(5.0, 0.9 * len(ref.classes)), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(ref.classes))
    a, b = ref.prediction_counts(), new.prediction_counts()
    ax.bar(x - 0.2, a / max(a.sum(), 1), width=0.4, color=_REF, label="reference")
    ax.bar(x + 0.2, b / max(b.sum(), 1), width=0.4, color=_NEW, label="batch")
    priors = ref.priors()
    if priors:
        ax.scatter(x - 0.2, [priors[c] for c in ref.classes], marker="_", s=200, color="black",
                   label="reference true priors")
    ax.set_xticks(x, [_mpl_text(c) for c in ref.classes], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction predicted")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_data_uri(fig)


def _confidence_plot(ref: Profile, new: Profile) -> str:
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 26).tolist()
    ax.hist(ref.confidence, bins=bins, density=True, alpha=0.55, color=_REF, label="reference")
    ax.hist(new.confidence, bins=bins, density=True, alpha=0.55, color=_NEW, label="batch")
    ax.set_xlabel("confidence (max softmax)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_data_uri(fig)


def render_drift_report(path: Path, report: DriftReport, ref: Profile, new: Profile, *,
                        info: list[tuple[str, str]], title: str = "DefectOps drift check") -> Path:
    """Write the HTML report to ``path`` (atomically) and return it."""
    plots = [("Image statistics (reference vs batch; red titles drifted)", _stats_plot(ref, new, report)),
             ("Intensity histograms (pooled, log scale)", _intensity_plot(ref, new, report)),
             ("Embeddings: 2-D PCA of the penultimate layer", _pca_plot(ref, new)),
             ("Prediction mix", _mix_plot(ref, new)),
             ("Confidence", _confidence_plot(ref, new))]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        title=title, report=report, info=info, plots=plots, fmt=_fmt, k=len(report.signals),
        threshold=report.alpha / max(len(report.signals), 1))
    _atomic_write_text(Path(path), html)
    return Path(path)


def report_info(model_source: str, images: str, found: int, used: int, meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [("model", model_source), ("images", images), ("images found / checked", f"{found} / {used}"),
            ("reference", f"{meta.get('summary', {}).get('rows', '?')} held-out crops of run {meta.get('run_id')}"),
            ("dataset fingerprint", str(meta.get("dataset_fingerprint", ""))[:16]), ("task", str(meta.get("task")))]
