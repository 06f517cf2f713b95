"""The published Triton repository served by a REAL ``tritonserver`` (2.51, from the nvidia-pytriton wheel, on CPU).

What is real: the server binary, its HTTP/gRPC/metrics endpoints, model repository parsing, dynamic batcher,
classification extension, the repository exactly as ``defectops serve publish`` writes it (``platform:
"onnxruntime_onnx"``), and ``defectops.serving.client`` / ``defectops infer`` over both protocols.

What is NOT: the wheel ships no C++ onnxruntime backend, so ``onnxruntime`` here is a Python-based backend, TEST
SUPPORT ONLY (tests/triton_backend/onnxruntime/model.py): it runs the same ONNX file with onnxruntime, batching the
requests Triton's dynamic batcher hands it. Production serves the same repository with Triton's own backend.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from s3server import free_ports
from tiny import TinyRun
from triton_backend.server import TritonServer, triton_server
from typer.testing import CliRunner

from defectops.pipelines.cli import EXIT_FAILURE, EXIT_USAGE, app
from defectops.serving.client import TritonClient, TritonClientError
from defectops.serving.model_ref import from_onnx
from defectops.serving.onnx_export import onnx_logits, onnx_session
from defectops.serving.predict import predict_images
from defectops.training.engine import softmax
from defectops.training.images import preprocess_for_model
from defectops.training.snapshot import load_snapshot

PROTOCOLS = ["http", "grpc"]
TRITON_MODEL = "defectops-aoi"  # the tiny run's registered model, as conftest's triton_repository publishes it


def _url(triton: TritonServer, protocol: str) -> str:
    return triton.http_url if protocol == "http" else triton.grpc_url


def _crops(tiny_run: TinyRun, n: int | None = None, split: str = "test") -> tuple[list[Path], list[str]]:
    snap = load_snapshot(tiny_run.root / "data" / "crops")
    samples = [s for s in snap.samples if s["split"] == split][:n]
    return [snap.file(s["path"]) for s in samples], [s["label"] for s in samples]


def _metric(text: str, name: str) -> float:
    m = re.search(rf'^{name}{{model="{TRITON_MODEL}",version="\d+"}} (\S+)$', text, re.M)
    assert m, f"{name} missing from the metrics:\n{text[:2000]}"
    return float(m.group(1))


def test_live_and_ready(triton: TritonServer) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{TRITON_MODEL}/ready"):
        with urllib.request.urlopen(f"http://{triton.http_url}{path}", timeout=5) as r:
            assert r.status == 200, path
    import tritonclient.grpc as grpcclient

    g = grpcclient.InferenceServerClient(triton.grpc_url)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(TRITON_MODEL)
    g.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_metadata_and_labels(triton: TritonServer, tiny_run: TinyRun, protocol: str) -> None:
    model = from_onnx(tiny_run.root / "export" / "model.onnx")
    with TritonClient(_url(triton, protocol), protocol=protocol) as c:
        assert c.model == TRITON_MODEL  # the only model served
        assert c.metadata["platform"] == "onnxruntime_onnx"
        assert [(i["name"], i["datatype"], [int(d) for d in i["shape"]]) for i in c.metadata["inputs"]] == \
            [("images", "FP32", [-1, 3, model.input_size, model.input_size])]
        assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in c.metadata["outputs"]] == \
            [("logits", "FP32", [-1, len(model.classes)])]
        assert c.max_batch_size == 64
        assert c.labels == model.classes  # from the config's defectops.classes parameter
        assert c.fit_mode == model.fit_mode
        # and the same labels through Triton's classification extension over labels.txt
        assert tuple(c._labels_from_server()) == model.classes
    cfg = json.load(urllib.request.urlopen(f"http://{triton.http_url}/v2/models/{TRITON_MODEL}/config", timeout=5))
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8, 32]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert cfg["output"][0]["label_filename"] == "labels.txt"
    assert cfg["version_policy"] == {"latest": {"num_versions": 2}}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batched_inference_equals_onnxruntime(triton: TritonServer, tiny_run: TinyRun, protocol: str) -> None:
    model = from_onnx(tiny_run.root / "export" / "model.onnx")
    paths, _ = _crops(tiny_run, split="train")
    paths = (paths * (1 + 70 // max(len(paths), 1)))[:70]  # more than max_batch_size: the client splits requests
    x = preprocess_for_model(paths, model.input_size, model.fit_mode)
    ref = onnx_logits(onnx_session(model.onnx_path), x)
    with TritonClient(_url(triton, protocol), TRITON_MODEL, protocol) as c:
        r = c.classify(x)
        assert np.abs(r.logits - ref).max() < 1e-5
        np.testing.assert_allclose(r.probabilities, softmax(ref), atol=1e-5)
        assert r.predicted == [model.classes[k] for k in ref.argmax(1)]
        # uint8 RGB images are fitted and scaled as preprocess_for_model does for files
        u8 = np.round(x[:5] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.abs(c.classify(u8).logits - ref[:5]).max() < 1e-5
        assert np.abs(c.classify_files(paths[:3]).logits - ref[:3]).max() < 1e-5


def test_dynamic_batching_under_concurrent_requests(triton: TritonServer, tiny_run: TinyRun) -> None:
    """64 single-image requests fired together, half over HTTP and half over gRPC, are executed in fewer batches."""
    model = from_onnx(tiny_run.root / "export" / "model.onnx")
    paths, _ = _crops(tiny_run, 64, split="train")
    paths = (paths * 64)[:64]
    x = preprocess_for_model(paths, model.input_size, model.fit_mode)
    ref = onnx_logits(onnx_session(model.onnx_path), x)
    n = len(x)
    protocols = PROTOCOLS * (n // 2)
    connected = threading.Barrier(n + 1)  # every client connected, metrics read: then all fire at once
    fire = threading.Barrier(n + 1)
    results: list[np.ndarray | None] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:  # the HTTP client (gevent) must stay in the thread that made it
            with TritonClient(_url(triton, protocols[i]), TRITON_MODEL, protocols[i]) as c:
                connected.wait(timeout=60)
                fire.wait(timeout=60)
                results[i] = c.classify(x[i:i + 1]).logits
        except BaseException as e:  # noqa: BLE001 - collected and re-raised by the test
            errors.append(e)
            connected.abort()
            fire.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    before = ""
    try:
        connected.wait(timeout=60)
        before = triton.metrics()
        fire.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    got = np.concatenate([r for r in results if r is not None])
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5  # each answer went back to its request
    def delta() -> dict[str, float]:
        after = triton.metrics()
        return {k: _metric(after, k) - _metric(before, k)
                for k in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success",
                          "nv_inference_queue_duration_us")}

    # the server may publish its counters a moment after the answers went back (seen under load: 41 of 64): read
    # them until every request is counted (a hang guard, not a timing assertion), then check them exactly
    counted = threading.Event()
    for _ in range(150):
        if delta()["nv_inference_request_success"] >= n:
            break
        counted.wait(0.2)
    d = delta()
    assert d["nv_inference_count"] == n, d
    assert d["nv_inference_request_success"] == n
    assert d["nv_inference_exec_count"] < n, d  # requests were batched together
    assert d["nv_inference_queue_duration_us"] > 0


def test_infer_cli_against_the_server(triton: TritonServer, tiny_run: TinyRun, tmp_path: Path) -> None:
    """``defectops infer`` prints the classes in-process onnxruntime (``predict_images``) gives, over both protocols."""
    paths, _ = _crops(tiny_run, 6)
    model = from_onnx(tiny_run.root / "export" / "model.onnx")
    predict_images(model, paths, tmp_path / "ref.csv")
    with (tmp_path / "ref.csv").open() as f:
        ref = list(csv.DictReader(f))
    runner = CliRunner()
    for protocol in PROTOCOLS:
        out = tmp_path / f"{protocol}.csv"
        r = runner.invoke(app, ["infer", "--url", _url(triton, protocol), "--protocol", protocol, "--model",
                                TRITON_MODEL, *map(str, paths), "--out", str(out)])
        assert r.exit_code == 0, r.output
        for row in ref:  # one table row per image: class and confidence (the path cell may wrap)
            assert re.search(rf"│ {re.escape(row['predicted'])}\s+│\s+{float(row['confidence']):.4f} │", r.output), \
                (row, r.output)
        with out.open() as f:
            got = list(csv.DictReader(f))
        assert [g["path"] for g in got] == [row["path"] for row in ref]
        assert [g["predicted"] for g in got] == [row["predicted"] for row in ref]
        for g, row in zip(got, ref, strict=True):
            for c in model.classes:
                assert abs(float(g[f"p_{c}"]) - float(row[f"p_{c}"])) <= 2e-6


def test_client_errors_name_the_url_and_the_fix(triton: TritonServer, tiny_run: TinyRun) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    for protocol in PROTOCOLS:
        with pytest.raises(TritonClientError, match=rf"{re.escape(dead)} \({protocol}\) is unreachable .*"
                                                   r"tritonserver is running") as e:
            TritonClient(dead, TRITON_MODEL, protocol, timeout=2)
        assert not e.value.usage and "\n" not in str(e.value)
        with pytest.raises(TritonClientError, match=r"model 'nope' is not in the repository of Triton at "
                                                   rf"{re.escape(_url(triton, protocol))}.*defectops-aoi.*--model"):
            TritonClient(_url(triton, protocol), "nope", protocol)
    runner = CliRunner()
    paths, _ = _crops(tiny_run, 1)
    r = runner.invoke(app, ["infer", "--url", dead, str(paths[0])])
    assert r.exit_code == EXIT_FAILURE and "is unreachable" in r.output
    r = runner.invoke(app, ["infer", "--url", triton.http_url, "--model", "nope", str(paths[0])])
    assert r.exit_code == EXIT_USAGE and "is not in the repository" in r.output
    for args in (["--protocol", "smtp", str(paths[0])], [str(paths[0].parent / "missing.png")], []):
        r = runner.invoke(app, ["infer", "--url", triton.http_url, *args])
        assert r.exit_code == EXIT_USAGE, (args, r.output)
    bad = paths[0].parent.parent / "broken.png"
    try:
        bad.write_bytes(b"not an image")
        r = runner.invoke(app, ["infer", "--url", triton.http_url, str(bad)])
        assert r.exit_code == EXIT_FAILURE and "broken.png" in r.output
    finally:
        bad.unlink()


def test_model_that_did_not_load_is_reported_not_ready(triton_repository: Path, tmp_path: Path) -> None:
    """A model whose file is corrupt stays UNAVAILABLE: the client says so, naming the server and the fix."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(triton_repository, repo)
    broken = repo / "broken"
    shutil.copytree(repo / TRITON_MODEL, broken)
    cfg = broken / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace(f'name: "{TRITON_MODEL}"', 'name: "broken"'))
    for onnx_file in broken.glob("*/model.onnx"):
        onnx_file.write_bytes(b"not an onnx model")
    with triton_server(repo, tmp_path / "server", extra_args=["--exit-on-error=false"], wait_for="live") as server:
        with pytest.raises(TritonClientError, match=r"model 'broken' at Triton at .* is not ready \(UNAVAILABLE.*"
                                                   r"check the server log") as e:
            TritonClient(server.http_url, "broken")
        assert not e.value.usage
        with pytest.raises(TritonClientError, match=r"serves several models \(broken, defectops-aoi\): choose one "
                                                   r"with --model"):
            TritonClient(server.grpc_url, protocol="grpc")
        with TritonClient(server.grpc_url, TRITON_MODEL, "grpc") as ok:  # the good one is served all the same
            assert ok.labels[0] == "false_call"
