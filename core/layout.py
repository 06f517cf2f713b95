"""The run-root layout: where every file of a run lives, relative to its run root, typed once.

Why one object: the steps write these files, the runners mark and upload them, the CLI, the model resolver, drift and
the benchmarks read them; a path typed as a literal in each of them drifts apart. Attribute access means a typo fails
the type check, not a run. The layout is a contract (docs/architecture.md): renaming a field's value breaks resuming
every existing run root.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunLayout:
    """Relative paths of a run root's files and folders (join with the root: ``root / RUN.metrics``)."""

    config: str = "config.yaml"
    summary: str = "summary.json"
    steps: str = "steps"
    # pull_data / validate_data
    snapshot: str = "data/snapshot"
    boards: str = "data/boards"
    validation: str = "data/validation.json"
    duplicates: str = "data/duplicates.json"
    crops: str = "data/crops"
    shortcut: str = "data/shortcut.json"
    # train
    checkpoints: str = "train/checkpoints"
    model: str = "train/model.pt"
    mlflow_run: str = "train/mlflow_run.json"
    # evaluate
    predictions: str = "eval/predictions.npz"
    champion_metrics: str = "eval/champion_metrics.json"
    detector: str = "eval/detector.json"
    anomaly: str = "eval/anomaly.json"  # task=anomaly: threshold, score normalisation, AUROC of val and test
    misses: str = "eval/misses"
    board_metrics: str = "board_metrics.json"
    metrics: str = "metrics.json"
    gates: str = "gates.json"
    report: str = "report.html"
    # register
    registered_model: str = "register/model"
    review_evidence: str = "register/evidence"
    registration: str = "registry.json"
    drift: str = "drift"  # the reference profile drift checks compare against
    trigger_report: str = "trigger/drift-report.json"  # the drift report that started this run, if one did
    # export / verify_export
    onnx: str = "export/model.onnx"
    onnx_int8: str = "export/model.int8.onnx"
    int8_report: str = "export/int8.json"
    parity: str = "export/parity.json"
    onnx_metrics: str = "export/metrics.json"
    onnx_gates: str = "export/gates.json"
    onnx_board_metrics: str = "export/board_metrics.json"
    triton: str = "triton"

    def marker(self, step: str) -> str:
        """The completion marker of ``step`` (its result and timing), written last by the runner."""
        return f"{self.steps}/{step}.json"


RUN = RunLayout()
