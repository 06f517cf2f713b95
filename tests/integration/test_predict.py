"""`defectops predict boards|images` with models from a run root, an ONNX file and the registry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny import TinyRun
from typer.testing import CliRunner

from defectops.evaluation.deeppcb import parse_result_file
from defectops.pipelines.cli import EXIT_USAGE, app

LENIENT = ["gates.min_macro_recall=0", "gates.min_class_recall=0", "gates.max_escape_rate=1",
           "gates.max_false_call_rate=1"]


def test_predict_boards_from_registry_and_run_root(tiny_run: TinyRun, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFECTOPS_HOME", str(tiny_run.home))
    boards = tiny_run.root / "data" / "boards"
    runner = CliRunner()
    outs = {}
    for name, ref in (("registry", "models:/defectops-aoi@challenger"), ("root", str(tiny_run.root)),
                      ("onnx", str(tiny_run.root / "export" / "model.onnx"))):
        out = tmp_path / name
        r = runner.invoke(app, ["predict", "boards", "--model", ref, "--input", str(boards), "--list",
                                str(boards / "trainval.txt"), "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert "images/s" in r.output
        assert "mAP" in r.output  # every annotation exists, so the DeepPCB metric is printed
        outs[name] = {p.name: p.read_text() for p in sorted(out.glob("*.txt"))}
    n_pairs = len((boards / "trainval.txt").read_text().split("\n"))
    assert len(outs["root"]) == n_pairs
    assert outs["registry"] == outs["root"] == outs["onnx"]
    for text in outs["root"].values():
        dets = parse_result_file(text)
        assert [d.confidence for d in dets] == sorted((d.confidence for d in dets), reverse=True)
        assert all(d.label in {"open", "short", "mousebite", "spur", "copper", "pin-hole"} for d in dets)


def test_predict_boards_bad_references(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFECTOPS_HOME", str(tiny_run.home))
    boards = tiny_run.root / "data" / "boards"
    runner = CliRunner()
    common = ["--input", str(boards), "--list", str(boards / "trainval.txt"), "--out", str(tmp_path / "o")]
    for ref, words in (("models:/defectops-aoi@nope", "not found"), (str(tmp_path), "no export/model.onnx"),
                       ("models:/x", "bad registry reference")):
        r = runner.invoke(app, ["predict", "boards", "--model", ref, *common])
        assert r.exit_code == EXIT_USAGE, r.output
        assert words in r.output
    r = runner.invoke(app, ["predict", "boards", "--model", str(tiny_run.root), "--input", str(tmp_path),
                            "--list", str(boards / "trainval.txt"), "--out", str(tmp_path / "o")])
    assert r.exit_code == EXIT_USAGE
    assert "--input" in r.output


def test_predict_images_matches_training_preprocessing(tmp_path: Path, home: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "crops"
    for k, cls in enumerate(("normal", "bridge", "missing")):
        (root / cls).mkdir(parents=True)
        for i in range(24):
            h, w = (int(v) for v in rng.integers(16, 90, 2))
            img = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
            img[: h // 3 if k == 1 else 1, : w // 3 if k == 2 else 1] = 255
            cv2.imwrite(str(root / cls / f"joint ({i}) ü.png"), img if i % 2 else img[:, :, 0])
    runner = CliRunner()
    r = runner.invoke(app, ["run", "+experiment=folder", f"data.root={root}", "train.epochs=2", *LENIENT])
    assert r.exit_code == 0, r.output
    run_root = next((home / "runs").glob("folder-*"))
    out = tmp_path / "preds.csv"
    r = runner.invoke(app, ["predict", "images", "--model", "models:/defectops-folder@challenger", "--input",
                            str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 72
    assert set(rows[0]) == {"path", "predicted", "confidence", "p_normal", "p_bridge", "p_missing"}
    # the test split's predictions equal what evaluate computed from the training-pipeline crops
    pred = np.load(run_root / "eval" / "predictions.npz")
    crops = {json.loads(line)["path"]: json.loads(line) for line in
             (run_root / "data" / "crops" / "manifest.jsonl").read_text().splitlines()}
    by_source = {str(root / crops[p]["source"]): i for i, p in enumerate(pred["paths"])}
    classes = json.loads((run_root / "data" / "crops" / "classes.json").read_text())
    checked = 0
    for row in rows:
        if row["path"] in by_source:
            logits = pred["logits"][by_source[row["path"]]]
            assert row["predicted"] == classes[int(logits.argmax())]
            checked += 1
    assert checked == len(pred["paths"])
    r = runner.invoke(app, ["predict", "boards", "--model", "models:/defectops-folder@challenger", "--input",
                            str(root), "--list", str(root / "x.txt"), "--out", str(tmp_path / "o")])
    assert r.exit_code == EXIT_USAGE


def test_precision_picks_the_served_or_the_asked_artifact(tiny_run: TinyRun, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from defectops.registry.mlflow_registry import client as make_client
    from defectops.serving.model_ref import ModelRefError, resolve

    root, home = Path(tiny_run.root), Path(tiny_run.home)
    uri, cache = f"sqlite:///{home / 'mlflow.db'}", tmp_path / "cache"
    verified = json.loads((root / "steps" / "verify_export.json").read_text())["result"]
    assert verified["served"] == "fp32" and verified["int8"]["publish"]  # tiny: export.serve=fp32, INT8 verified
    mv = make_client(uri).get_model_version("defectops-aoi", "1")
    assert mv.tags["defectops.served_precision"] == "fp32"

    assert resolve(str(root), tracking_uri=uri, cache_dir=cache).onnx_path == root / "export" / "model.onnx"
    assert resolve(str(root), tracking_uri=uri, cache_dir=cache, precision="int8").onnx_path == \
        root / "export" / "model.int8.onnx"
    served = resolve("models:/defectops-aoi/1", tracking_uri=uri, cache_dir=cache)
    int8 = resolve("models:/defectops-aoi/1", tracking_uri=uri, cache_dir=cache, precision="int8")
    assert served.onnx_path.name == "model.onnx" and int8.onnx_path.name == "model.int8.onnx"
    assert int8.onnx_path.read_bytes() == (root / "export" / "model.int8.onnx").read_bytes()
    assert served.onnx_path.is_file() and served.onnx_path.parent != int8.onnx_path.parent  # cached apart
    assert int8.source.endswith("(version 1, int8)") and int8.classes == served.classes

    fake = tmp_path / "run"  # a run root whose verify_export served INT8, then one whose INT8 was refused
    shutil.copytree(root / "export", fake / "export")
    (fake / "steps").mkdir()
    marker = json.loads((root / "steps" / "verify_export.json").read_text())
    marker["result"]["served"] = "int8"
    (fake / "steps" / "verify_export.json").write_text(json.dumps(marker))
    assert resolve(str(fake), tracking_uri=uri, cache_dir=cache).onnx_path == fake / "export" / "model.int8.onnx"
    marker["result"].update(served="fp32", int8={**marker["result"]["int8"], "publish": False})
    (fake / "steps" / "verify_export.json").write_text(json.dumps(marker))
    with pytest.raises(ModelRefError, match="no verified INT8"):
        resolve(str(fake), tracking_uri=uri, cache_dir=cache, precision="int8")
    with pytest.raises(ModelRefError, match="unknown precision"):
        resolve(str(root), tracking_uri=uri, cache_dir=cache, precision="fp16")

    monkeypatch.setenv("DEFECTOPS_HOME", str(home))
    boards = root / "data" / "boards"
    r = CliRunner().invoke(app, ["predict", "boards", "--model", "models:/defectops-aoi@challenger", "--precision",
                                 "int8", "--input", str(boards), "--list", str(boards / "trainval.txt"), "--out",
                                 str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "int8" in r.output
