"""task=anomaly end to end: PatchCore fitted on good parts only goes through the same DAG, gates, registry, ONNX
verification and Triton repository as the classifiers; an export whose scores drift is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.pipelines.config import DefectOpsConfig, load_config
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.dag import STEP_NAMES
from defectops.pipelines.runners.local import run_pipeline
from defectops.pipelines.tasks import create_task
from defectops.registry.mlflow_registry import client

OVERRIDES = ["task=anomaly", "data.source=folder", "data.good_class=good", "anomaly.height=64", "anomaly.width=96",
             "data.dedup.near=false", "anomaly.batch_size=16", "data.split.val=0.3", "data.split.test=0.3"]


@dataclass
class AnomalyRun:
    home: Path
    root: Path
    cfg: DefectOpsConfig
    ctx: StepContext


def _parts(root: Path, seed: int = 0) -> Path:
    """Good parts (a lit gradient with sensor noise) and scratched ones (a dark line somewhere on the part)."""
    rng = np.random.default_rng(seed)
    for cls, n in (("good", 48), ("scratch", 16)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.tile(np.linspace(60, 190, 120), (80, 1)) + rng.normal(0, 6, (80, 120))
            if cls == "scratch":
                y, x = rng.integers(10, 60), rng.integers(10, 90)
                img[y:y + 4, x:x + 20] = 20
            cv2.imwrite(str(root / cls / f"{cls}{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory: pytest.TempPathFactory) -> AnomalyRun:
    data = _parts(tmp_path_factory.mktemp("parts"))
    home = tmp_path_factory.mktemp("anomaly-home")
    cfg = load_config([*OVERRIDES, f"data.root={data}"])
    ctx, outcomes = run_pipeline(cfg, home=home)
    assert [o.name for o in outcomes] == list(STEP_NAMES)
    return AnomalyRun(home, ctx.root, cfg, ctx)


def test_a_gated_challenger_is_registered(anomaly_run: AnomalyRun) -> None:
    s = json.loads((anomaly_run.root / RUN.summary).read_text())
    assert s["gates_passed"] is True and s["aliases"] == ["challenger"]
    assert s["metrics"]["escape_rate"] is not None and s["metrics"]["false_call_rate"] is not None
    train = json.loads((anomaly_run.root / RUN.marker("train")).read_text())["result"]
    assert train["bank_size"] > 0 and train["fit_images"] == train["class_counts"]["good"]
    validated = json.loads((anomaly_run.root / RUN.marker("validate_data")).read_text())["result"]
    assert validated["prepared"]["images"]["train"] == {"good": train["fit_images"]}  # good parts only
    mv = client(s["tracking_uri"]).get_model_version(s["registered_model"], s["version"])
    assert mv.tags["defectops.export_verified"] == "true" and mv.tags["defectops.gates_passed"] == "true"


def test_threshold_normalisation_and_auroc_are_recorded_beside_the_model(anomaly_run: AnomalyRun) -> None:
    doc = json.loads((anomaly_run.root / RUN.anomaly).read_text())
    assert doc["normalization"]["version"] == "anomaly-score-v1"
    assert doc["val"]["n_defect"] > 0 and doc["val"]["n_good"] > 0
    assert doc["threshold"]["rule"] == "escape_rate" and doc["threshold"]["val_escape_rate"] == 0.0
    assert doc["test"]["image_auroc"]["point"] >= 0.9 and doc["test"]["n_defect"] > 0
    metrics = json.loads((anomaly_run.root / RUN.metrics).read_text())
    assert metrics["anomaly"]["threshold"] == doc["threshold"]
    report = (anomaly_run.root / RUN.report).read_text()
    assert "Anomaly scores, threshold and AUROC" in report and "ROC" in report
    tiles = json.loads((anomaly_run.root / RUN.misses / "index.json").read_text())
    assert tiles and all("score" in t["caption"] for t in tiles)


def test_the_model_file_loads_without_unpickling(anomaly_run: AnomalyRun) -> None:
    state = torch.load(anomaly_run.root / RUN.model, map_location="cpu", weights_only=True)
    assert state["format"] == "defectops-patchcore-v1" and state["input_hw"] == [64, 96]
    assert state["weights_info"]["weights_sha256"]


def test_the_registered_version_loads_without_unpickling(anomaly_run: AnomalyRun) -> None:
    from defectops.training.models.model_format import ANOMALY_WEIGHTS, META, load_registered_model
    from defectops.training.models.patchcore import load_anomaly_model

    s = json.loads((anomaly_run.root / RUN.summary).read_text())
    c = client(s["tracking_uri"])
    mv = c.get_model_version(s["registered_model"], s["version"])
    assert {a.path for a in c.list_artifacts(mv.run_id, "model")} == {f"model/{META}", f"model/{ANOMALY_WEIGHTS}"}
    net = load_registered_model(f"models:/{s['registered_model']}/{s['version']}", tracking_uri=s["tracking_uri"])
    ref, _ = load_anomaly_model(anomaly_run.root / RUN.model)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(net(x)[0], ref(x)[0])


def test_onnx_carries_raw_outputs_and_the_operating_point_as_metadata(anomaly_run: AnomalyRun) -> None:
    model = onnx.load(str(anomaly_run.root / RUN.onnx), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["scores", "anomaly_map"]
    meta = {p.key: p.value for p in model.metadata_props}
    anomaly = json.loads(meta["defectops.anomaly"])
    doc = json.loads((anomaly_run.root / RUN.anomaly).read_text())
    assert anomaly["threshold"] == doc["threshold"]["value"] and anomaly["normalization"] == doc["normalization"]
    assert json.loads(meta["defectops.input_hw"]) == [64, 96] and meta["defectops.task"] == "anomaly"
    parity = json.loads((anomaly_run.root / RUN.parity).read_text())
    assert parity["decision_flips"] == 0 and parity["max_rel_diff"] <= anomaly_run.cfg.anomaly.max_score_rel_diff
    config = next((anomaly_run.root / RUN.triton).glob("*/config.pbtxt")).read_text()
    assert 'name: "scores"' in config and 'name: "anomaly_map"' in config and "dims: [ 1, 64, 96 ]" in config


def test_predict_images_returns_score_decision_and_map(anomaly_run: AnomalyRun, tmp_path: Path) -> None:
    """`defectops predict images` on the run's ONNX export: the decisions and scores the checkpoint gave, the maps."""
    import csv

    from typer.testing import CliRunner

    from defectops.pipelines.cli import app

    data = _parts(tmp_path / "new", seed=11)
    files = sorted((data / "good").glob("*.png"))[:4] + sorted((data / "scratch").glob("*.png"))[:4]
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    inputs = [arg for f in files for arg in ("--input", str(f))]
    r = CliRunner().invoke(app, ["predict", "images", "--model", str(anomaly_run.root), *inputs, "--out", str(out),
                                 "--maps", str(maps)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["decision"] for row in rows] == ["good"] * 4 + ["defect"] * 4
    threshold = json.loads((anomaly_run.root / RUN.anomaly).read_text())["threshold"]["value"]
    assert all((float(row["score"]) >= threshold) == (row["decision"] == "defect") for row in rows)
    assert all((float(row["normalised"]) >= 0) == (row["decision"] == "defect") for row in rows)
    arrays = sorted(maps.glob("*.npy"))
    assert len(arrays) == 8 and len(list(maps.glob("*.png"))) == 8
    assert np.load(arrays[0]).shape == (64, 96)
    classifier = CliRunner().invoke(app, ["predict", "images", "--model", str(anomaly_run.root), "--input",
                                          str(files[0]), "--out", str(tmp_path / "x.csv")])
    assert classifier.exit_code == 0  # without --maps: scores only


def test_triton_serves_the_scores_and_maps_onnxruntime_gives(anomaly_run: AnomalyRun, tmp_path: Path) -> None:
    """The verify step's Triton repository loaded by a real tritonserver (its onnxruntime backend is the test
    stand-in of tests/triton_backend): both outputs, batched, equal to onnxruntime on the same file."""
    import tritonclient.http as httpclient
    from triton_backend.server import triton_server

    from defectops.serving.onnx_export import onnx_session
    from defectops.training.data import load_split
    from defectops.training.snapshot import load_snapshot

    x, _, _ = load_split(load_snapshot(anomaly_run.root / RUN.crops), "test")
    images = (x[:5].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    ref_scores, ref_maps = onnx_session(anomaly_run.root / RUN.onnx).run(["scores", "anomaly_map"], {"images": images})
    with triton_server(anomaly_run.root / RUN.triton, tmp_path / "server") as server:
        client = httpclient.InferenceServerClient(server.http_url)
        name = anomaly_run.cfg.registry.model_name
        meta = client.get_model_metadata(name)
        assert [o["name"] for o in meta["outputs"]] == ["scores", "anomaly_map"]
        inp = httpclient.InferInput("images", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        res = client.infer(name, [inp], outputs=[httpclient.InferRequestedOutput("scores"),
                                                 httpclient.InferRequestedOutput("anomaly_map")])
        assert np.allclose(res.as_numpy("scores"), ref_scores, rtol=1e-5, atol=1e-5)
        assert res.as_numpy("anomaly_map").shape == (5, 1, 64, 96)
        assert np.allclose(res.as_numpy("anomaly_map"), ref_maps, rtol=1e-5, atol=1e-4)
        client.close()

        import csv

        from typer.testing import CliRunner

        from defectops.pipelines.cli import app

        data = _parts(tmp_path / "parts", seed=5)
        chosen = sorted((data / "good").glob("*.png"))[:3] + sorted((data / "scratch").glob("*.png"))[:3]
        files = [str(f) for f in chosen]
        out = tmp_path / "infer.csv"
        r = CliRunner().invoke(app, ["infer", *files, "--url", server.http_url, "--out", str(out)])
        assert r.exit_code == 0, r.output
        local = tmp_path / "local.csv"
        assert CliRunner().invoke(app, ["predict", "images", "--model", str(anomaly_run.root), "--out", str(local),
                                        *[a for f in files for a in ("--input", f)]]).exit_code == 0
        served, direct = list(csv.DictReader(out.open())), list(csv.DictReader(local.open()))
        assert [row["decision"] for row in served] == ["good"] * 3 + ["defect"] * 3
        assert [row["decision"] for row in served] == [row["decision"] for row in direct]
        assert np.allclose([float(row["score"]) for row in served], [float(row["score"]) for row in direct],
                           rtol=1e-5)


def test_drift_check_of_an_anomaly_model(anomaly_run: AnomalyRun, tmp_path: Path) -> None:
    """Good parts like those it was profiled on: no drift; the same parts photographed much darker: drift."""
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app

    same = _parts(tmp_path / "same", seed=7) / "good"
    dark = tmp_path / "dark"
    dark.mkdir()
    for f in sorted(same.glob("*.png"))[:40]:
        cv2.imwrite(str(dark / f.name), (cv2.imread(str(f)) * 0.4).astype(np.uint8))
    runner = CliRunner()
    ok = runner.invoke(app, ["drift", "check", "--model", str(anomaly_run.root), "--images", str(same), "--json",
                             "--permutations", "500"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["drifted"] is False
    drifted = runner.invoke(app, ["drift", "check", "--model", str(anomaly_run.root), "--images", str(dark), "--json",
                                  "--permutations", "500"])
    assert drifted.exit_code == 3, drifted.output
    assert json.loads(drifted.output)["drifted"] is True


def test_the_champion_is_scored_on_the_same_test_images(anomaly_run: AnomalyRun, tmp_path: Path) -> None:
    """With version 1 as champion, a second run compares itself with it on its own test images (no-regression
    gates), at the champion's own threshold."""
    s = json.loads((anomaly_run.root / RUN.summary).read_text())
    c = client(s["tracking_uri"])
    c.set_registered_model_alias(s["registered_model"], "champion", s["version"])
    cfg = load_config([*OVERRIDES, f"data.root={anomaly_run.cfg.data.root}", "seed=1", "run.name=second"])
    ctx, _ = run_pipeline(cfg, home=anomaly_run.home)
    evaluate = json.loads((ctx.root / RUN.marker("evaluate")).read_text())["result"]
    assert evaluate["champion_version"] == f"version {s['version']}"
    champion = json.loads((ctx.root / RUN.champion_metrics).read_text())
    assert champion["n"] == json.loads((ctx.root / RUN.metrics).read_text())["n"]
    gates = [g["name"] for g in json.loads((ctx.root / RUN.gates).read_text())["results"]]
    assert any("regression" in g for g in gates), gates
    c.delete_registered_model_alias(s["registered_model"], "champion")


BOARDS = ["+experiment=anomaly_boards", "data.synth.n_boards=24", "data.synth.size=256", "anomaly.height=128",
          "anomaly.width=128", "anomaly.max_bank=2000", "gates.min_macro_recall=0", "gates.min_class_recall=0",
          "gates.max_escape_rate=1", "gates.max_false_call_rate=1"]


@pytest.fixture(scope="module")
def board_run(tmp_path_factory: pytest.TempPathFactory) -> AnomalyRun:
    """Synthetic board pairs: the memory bank from the train boards' templates, boxes from maps on val and test."""
    home = tmp_path_factory.mktemp("anomaly-boards-home")
    cfg = load_config(BOARDS)
    ctx, outcomes = run_pipeline(cfg, home=home)
    assert [o.name for o in outcomes] == list(STEP_NAMES)
    return AnomalyRun(home, ctx.root, cfg, ctx)


def test_board_pairs_fit_on_templates_and_score_the_tested_images(board_run: AnomalyRun) -> None:
    from defectops.training.snapshot import load_snapshot

    crops = load_snapshot(board_run.root / RUN.crops)
    boards = load_snapshot(board_run.root / RUN.snapshot)
    train = [s for s in crops.samples if s["split"] == "train"]
    assert train and all(s["origin"] == "template" and s["label"] == "good" for s in train)
    validated = json.loads((board_run.root / RUN.marker("validate_data")).read_text())["result"]["prepared"]
    assert validated["train_tested_images_unused"] == len(train)  # one template per train board, no tested image
    tested = [s for s in crops.samples if s["origin"] == "tested"]
    assert tested and {s["split"] for s in tested} == {"val", "test"}
    by_source = {b["path"]: b for b in boards.samples}
    for s in tested:  # boxes kept, normalised to the board's 256 pixels
        assert s["boxes"] == [[b[0] / 256, b[1] / 256, b[2] / 256, b[3] / 256, b[4]]
                              for b in by_source[s["source"]]["boxes"]]
        assert s["label"] == ("defect" if s["boxes"] else "good")
    train_sources = {s["source"] for s in train}
    assert not train_sources & {by_source[s["source"]]["template"] for s in tested}  # held-out boards only


def test_boxes_from_maps_are_scored_by_the_deeppcb_rule(board_run: AnomalyRun) -> None:
    from defectops.training.snapshot import load_snapshot

    doc = json.loads((board_run.root / RUN.anomaly).read_text())
    boxes = doc["boxes"]
    assert boxes["min_area"] == board_run.cfg.anomaly.box_min_area and boxes["map_threshold"]["candidates"] > 1
    crops = load_snapshot(board_run.root / RUN.crops)
    for split in ("val", "test"):
        b = boxes[split]
        truth = [s for s in crops.samples if s["split"] == split and s["origin"] == "tested" and s["boxes"]]
        assert b["n_images"] == len(truth) and b["n_gt"] == sum(len(s["boxes"]) for s in truth)
        assert b["found"] <= b["n_gt"] and b["covered"] <= b["n_boxes"]
        assert b["recall"]["point"] == pytest.approx(b["found"] / b["n_gt"])
        assert b["recall"]["low"] <= b["recall"]["point"] <= b["recall"]["high"]
        assert b["deeppcb"]["n_gt"] == b["n_gt"] and b["deeppcb"]["n_det"] == b["n_boxes"]
        assert b["good_images"] == sum(1 for s in crops.samples if s["split"] == split and s["label"] == "good")
    assert doc["test"]["pixel_auroc"] is not None  # the boxes are the masks
    report = (board_run.root / RUN.report).read_text()
    assert "Boxes from anomaly maps" in report and "DeepPCB F (agnostic)" in report
    meta = {p.key: p.value for p in onnx.load(str(board_run.root / RUN.onnx), load_external_data=False).metadata_props}
    assert json.loads(meta["defectops.anomaly"])["boxes"] == {"map_threshold": boxes["map_threshold"]["value"],
                                                              "min_area": boxes["min_area"]}
    s = json.loads((board_run.root / RUN.summary).read_text())
    assert s["aliases"] == ["challenger"]


def test_predict_images_returns_boxes_in_the_image_pixels(board_run: AnomalyRun, tmp_path: Path) -> None:
    """A tested board through `predict images`: the boxes of its map at the model's map threshold, in the board's
    own pixels (256, the model sees 128)."""
    import csv

    from typer.testing import CliRunner

    from defectops.evaluation.anomaly_boxes import map_detections
    from defectops.pipelines.cli import app
    from defectops.serving.onnx_export import onnx_session
    from defectops.training.images import resized_image
    from defectops.training.snapshot import load_snapshot

    boards = load_snapshot(board_run.root / RUN.snapshot)
    tested = [boards.file(s["path"]) for s in boards.samples if s["split"] == "test"][:3]
    out = tmp_path / "boxes.csv"
    r = CliRunner().invoke(app, ["predict", "images", "--model", str(board_run.root), "--out", str(out),
                                 *[a for f in tested for a in ("--input", str(f))]])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    rule = json.loads((board_run.root / RUN.anomaly).read_text())["boxes"]
    session = onnx_session(board_run.root / RUN.onnx)
    for row, f in zip(rows, tested, strict=True):
        x = resized_image(f, 128, 128)[None].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        amap = session.run(["anomaly_map"], {"images": x})[0][0, 0]
        expected = map_detections(amap, rule["map_threshold"]["value"], min_area=rule["min_area"])
        got = json.loads(row["boxes"])
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert g[:4] == pytest.approx([2 * e.x1, 2 * e.y1, 2 * e.x2, 2 * e.y2], abs=0.1)
            assert all(0 <= v <= 256 for v in g[:4]) and 0 < g[4] <= 1


def test_infer_through_triton_returns_the_boxes_predict_gives(board_run: AnomalyRun, tmp_path: Path) -> None:
    """The board model's Triton repository on a real tritonserver: `defectops infer` draws the same boxes from the
    served maps as `predict images` from the ONNX file (the map threshold comes with the model's parameters)."""
    import csv

    from triton_backend.server import triton_server
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app
    from defectops.training.snapshot import load_snapshot

    boards = load_snapshot(board_run.root / RUN.snapshot)
    files = [str(boards.file(s["path"])) for s in boards.samples if s["split"] == "test"][:4]
    local = tmp_path / "local.csv"
    assert CliRunner().invoke(app, ["predict", "images", "--model", str(board_run.root), "--out", str(local),
                                    *[a for f in files for a in ("--input", f)]]).exit_code == 0
    with triton_server(board_run.root / RUN.triton, tmp_path / "server") as server:
        served = tmp_path / "served.csv"
        r = CliRunner().invoke(app, ["infer", *files, "--url", server.http_url, "--out", str(served),
                                     "--batch-size", "3"])
        assert r.exit_code == 0, r.output
    a, b = list(csv.DictReader(served.open())), list(csv.DictReader(local.open()))
    assert [row["decision"] for row in a] == [row["decision"] for row in b]
    for x, y in zip(a, b, strict=True):
        bx, by = json.loads(x["boxes"]), json.loads(y["boxes"])
        assert len(bx) == len(by) and np.allclose(np.asarray(bx).reshape(-1, 5), np.asarray(by).reshape(-1, 5),
                                                  atol=0.11)


def test_review_page_shows_the_anomaly_evidence(board_run: AnomalyRun, tmp_path: Path) -> None:
    """The candidate page of an anomaly version on a real `defectops review` server: AUROC with intervals, the
    threshold and its rule, the normalisation, the boxes table, and the heat-map tiles."""
    from review_support import Client, start_review_server

    s = json.loads((board_run.root / RUN.summary).read_text())
    doc = json.loads((board_run.root / RUN.anomaly).read_text())
    registry = {"home": board_run.home, "uri": s["tracking_uri"]}
    with start_review_server(registry, tmp_path) as server:
        c = Client(server.url)
        assert c.login("eng").status == 303
        page = c.get(f"/models/{s['registered_model']}/versions/{s['version']}")
    assert page.status == 200
    body = page.body
    assert 'data-testid="anomaly-auroc"' in body and 'data-testid="anomaly-boxes"' in body
    assert f"{doc['test']['image_auroc']['point']:.3f}" in body
    assert f"Threshold <strong>{doc['threshold']['value']:.5g}</strong>" in body
    assert "anomaly-score-v1" in body and "Grad-CAM" not in body
    tiles = json.loads((board_run.root / RUN.misses / "index.json").read_text())
    assert body.count('class="tile"') == len(tiles) > 0
    assert "green: annotated defects, red: boxes from the map" in body


def test_the_int8_backbone_is_verified_and_its_parity_recorded(anomaly_run: AnomalyRun) -> None:
    """export.int8 (on by default): the backbone is quantized, the nearest-neighbour part stays FP32, and the INT8
    model is scored like the checkpoint; on the test model it holds (measured max relative score difference 0.06)."""
    root = anomaly_run.root
    export = json.loads((root / RUN.marker("export")).read_text())["result"]["int8"]
    assert export["images"] == "good train" and export["op_types"] == ["Conv", "Clip", "Add"]
    model = onnx.load(str(root / RUN.onnx_int8))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["defectops.precision"] == "int8" and json.loads(meta["defectops.int8_calibration"])["samples"] > 0
    fp32 = {p.key: p.value for p in onnx.load(str(root / RUN.onnx), load_external_data=False).metadata_props}
    assert meta["defectops.anomaly"] == fp32["defectops.anomaly"]  # the operating point travels with it
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.op_type for n in model.graph.node if any(i in dq for i in n.input)}
    assert "Conv" in quantized and not quantized & {"MatMul", "ReduceMin", "TopK", "Sqrt"}  # k-NN part in FP32
    report = json.loads((root / RUN.int8_report).read_text())
    par = report["parity"]
    assert report["publish"] is True and report["reasons"] == [] and report["gates"]["passed"] is True
    assert 0 < par["max_rel_diff"] <= anomaly_run.cfg.anomaly.int8_max_score_rel_diff and par["decision_flips"] == 0
    verified = json.loads((root / RUN.marker("verify_export")).read_text())["result"]
    assert verified["served"] == "fp32" and verified["int8"]["publish"] is True  # export.serve=fp32 by default
    assert verified["int8"]["max_rel_diff"] == par["max_rel_diff"]
    s = json.loads((root / RUN.summary).read_text())
    mv = client(s["tracking_uri"]).get_model_version(s["registered_model"], s["version"])
    assert mv.tags["defectops.int8_published"] == "true" and mv.tags["defectops.int8_refused"] == "none"
    assert float(mv.tags["defectops.int8_max_score_rel_diff"]) == pytest.approx(par["max_rel_diff"], rel=1e-3)
    assert mv.tags["defectops.int8_decision_flips"] == "0"


def test_int8_is_served_where_it_holds_and_refused_without_failing_the_step(anomaly_run: AnomalyRun,
                                                                              tmp_path: Path) -> None:
    """export.serve=int8 on a copy of the run: the Triton repository gets the INT8 file; with an absurdly tight
    anomaly.int8_max_score_rel_diff the INT8 model is refused with the reason, FP32 is served, the step succeeds and
    the challenger is kept."""
    from dataclasses import replace

    from defectops.serving.config import Serve

    root = tmp_path / "run"
    shutil.copytree(anomaly_run.root, root)
    ctx = StepContext(anomaly_run.ctx.run_id, root, anomaly_run.home, anomaly_run.ctx.config_hash)
    cfg = anomaly_run.cfg
    export = replace(cfg.export, serve=Serve.int8)
    s = json.loads((anomaly_run.root / RUN.summary).read_text())
    c = client(s["tracking_uri"])

    aliases = set(c.get_model_version(s["registered_model"], s["version"]).aliases)  # other tests may move them

    def served_file() -> bytes:
        return next((root / RUN.triton).glob(f"*/{s['version']}/model.onnx")).read_bytes()

    held = create_task(TaskKind.anomaly, anomaly=cfg.anomaly).verify_export(ctx, cfg.data, export, cfg.gates,
                                                                            cfg.registry, cfg.detect)
    assert held.served == "int8" and served_file() == (root / RUN.onnx_int8).read_bytes()
    assert c.get_model_version(s["registered_model"], s["version"]).tags["defectops.served_precision"] == "int8"

    tight = create_task(TaskKind.anomaly, anomaly=replace(cfg.anomaly, int8_max_score_rel_diff=1e-9))
    refused = tight.verify_export(ctx, cfg.data, export, cfg.gates, cfg.registry, cfg.detect)
    assert refused.served == "fp32" and refused.int8 is not None and refused.int8["publish"] is False
    assert any("anomaly.int8_max_score_rel_diff 1e-09" in r for r in refused.int8["reasons"])
    assert served_file() == (root / RUN.onnx).read_bytes()
    report = json.loads((root / RUN.int8_report).read_text())
    assert report["publish"] is False and report["parity"]["max_rel_diff"] > 1e-9
    mv = c.get_model_version(s["registered_model"], s["version"])
    assert mv.tags["defectops.int8_published"] == "false" and "int8_max_score_rel_diff" in mv.tags[
        "defectops.int8_refused"]
    assert mv.tags["defectops.served_precision"] == "fp32" and mv.tags["defectops.export_verified"] == "true"
    assert set(mv.aliases) == aliases  # an INT8 refusal never removes the challenger


def test_an_export_whose_scores_drift_is_refused(anomaly_run: AnomalyRun, tmp_path: Path) -> None:
    """A copy of the run whose ONNX memory bank was nudged: verify_export refuses it and removes the challenger."""
    root = tmp_path / "run"
    shutil.copytree(anomaly_run.root, root)
    model = onnx.load(str(root / RUN.onnx))
    bank = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[1] == 152)
    values = onnx.numpy_helper.to_array(bank).copy()
    values *= 1.01
    bank.CopyFrom(onnx.numpy_helper.from_array(values, bank.name))
    onnx.save(model, str(root / RUN.onnx))
    ctx = StepContext(anomaly_run.ctx.run_id, root, anomaly_run.home, anomaly_run.ctx.config_hash)
    cfg = anomaly_run.cfg
    task = create_task(TaskKind.anomaly, anomaly=cfg.anomaly)
    with pytest.raises(StepError, match="image scores differ from the checkpoint's .* challenger alias removed|"
                                        "challenger alias removed: image scores differ"):
        task.verify_export(ctx, cfg.data, cfg.export, cfg.gates, cfg.registry, cfg.detect)
    s = json.loads((anomaly_run.root / RUN.summary).read_text())
    mv = client(s["tracking_uri"]).get_model_version(s["registered_model"], s["version"])
    assert mv.tags["defectops.export_verified"] == "false" and "challenger" not in mv.aliases
