"""Drift: the pure tests (evaluation/drift.py), synthetic drift scenarios, the measured false-alarm rate, the
reference profile of a registered version, `defectops drift check` (exit codes, JSON, HTML report, dry-run retrain
validated against the Argo schema) and the CI examples (GitHub Actions workflow and Argo CronWorkflow, both
schema-validated).

Scenarios use the tiny run's model and the project's synthetic board generator + candidate step: the reference is
the profile of the candidate crops of 60 fresh boards drawn like the tiny run's (~550 crops), each batch 200 crops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from repo_paths import REPO
from tiny import TinyRun
from typer.testing import CliRunner

from defectops.evaluation.drift import (
    Profile,
    compare,
    image_stats,
    ks,
    mmd_permutation_test,
    prediction_mix_test,
    psi,
)
from defectops.evaluation.drift_profile import load_profile, profile_from_images, save_profile
from defectops.pipelines.cli import app

BATCH = 200
FALSE_ALARM_DRAWS = 100
N_PERM = 2000  # >= k / alpha = 15 / 0.01, so the embedding signal can reach the Bonferroni threshold


# --------------------------------------------------------------------------------------------------- pure tests
def test_psi_ks_and_mix_on_known_distributions() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    assert psi(a, b) < 0.02 and psi(a, b + 1.0) > 0.5
    assert ks(a, b)[1] > 0.01 and ks(a, b + 0.5)[1] < 1e-6
    assert prediction_mix_test(np.array([80, 20, 0]), np.array([78, 22, 0]))[1] > 0.1
    assert prediction_mix_test(np.array([80, 20, 0]), np.array([40, 60, 0]))[1] < 1e-6


def test_mmd_permutation_test_detects_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 16))
    same = mmd_permutation_test(ref, rng.normal(size=(200, 16)), n_perm=500, seed=0)
    moved = mmd_permutation_test(ref, rng.normal(size=(200, 16)) + 0.4, n_perm=500, seed=0)
    assert same[1] > 0.01
    assert moved[1] == pytest.approx(1 / 501)


def test_image_stats_see_blur_and_brightness() -> None:
    rng = np.random.default_rng(2)
    img = (rng.random((8, 32, 32, 3)) > 0.5).astype(np.uint8) * 255
    f, h = image_stats(img)
    assert f.shape == (8, 12) and h.shape == (8, 3, 16)
    np.testing.assert_allclose(h.sum(-1), 1.0, rtol=1e-6)
    blurred = np.stack([cv2.GaussianBlur(x, (0, 0), 1.5) for x in img])
    assert (image_stats(blurred)[0][:, 6:9] < f[:, 6:9] / 4).all()  # sharpness = variance of the Laplacian
    darker = (img * 0.5).astype(np.uint8)
    assert (image_stats(darker)[0][:, :3] < f[:, :3]).all()


# --------------------------------------------------------------------------------------------------- scenarios
class Line:
    """The tiny run's model and the generator settings of its data."""

    def __init__(self, tiny_run: TinyRun) -> None:
        from defectops.training.crops import candidate_params
        from defectops.training.trainer import load_trained_model

        cfg = tiny_run.cfg
        self.net, state = load_trained_model(tiny_run.root / "train" / "model.pt")
        self.classes = tuple(state["classes"])
        self.synth = cfg.data.synth
        self.cand = cfg.data.candidates
        self.params = candidate_params(cfg.data.candidates)

    def boards(self, n: int, seed: int, **kw: Any) -> Any:
        from defectops.training.synth import generate_boards

        s = self.synth
        kw = {"size": s.size, "defects": tuple(s.defects), "nuisance": tuple(s.nuisance),
              "defect_rate": s.defect_rate, **kw}
        return generate_boards(n, seed, **kw)

    def crops(self, boards: Any, edit: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
              | None = None) -> np.ndarray:
        from defectops.training.crops import propose

        out = []
        for i, b in enumerate(boards):
            template, tested = (b.template, b.tested) if edit is None else edit(b.template, b.tested, i)
            _, c = propose(template, tested, self.params, self.cand.crop_size, self.cand.context)
            out.append(c)
        return np.concatenate(out)

    def profile(self, images: np.ndarray) -> Profile:
        return profile_from_images(self.net, images, self.classes, "aoi")


@pytest.fixture(scope="module")
def line(tiny_run: TinyRun) -> Line:
    return Line(tiny_run)


@pytest.fixture(scope="module")
def reference(line: Line) -> Profile:
    return line.profile(line.crops(line.boards(60, 101)))


def _with_diff(x: np.ndarray) -> np.ndarray:
    """Crops whose tested channel changed: recompute the difference channel as the candidate step does."""
    x = x.copy()
    x[..., 2] = np.abs(x[..., 0].astype(np.int16) - x[..., 1].astype(np.int16)).astype(np.uint8)
    return x


def _brightness_contrast(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    t = x[..., 0].astype(np.float32)
    x[..., 0] = np.clip((t - 128) * 0.7 + 128 + 25, 0, 255).astype(np.uint8)  # lower contrast, brighter
    return _with_diff(x)


def _blur(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    for i in range(len(x)):
        x[i, ..., 0] = cv2.GaussianBlur(np.ascontiguousarray(x[i, ..., 0]), (0, 0), 1.2)
    return _with_diff(x)


def _scratches(template: np.ndarray, tested: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect type the generator (and so the model) never produced: long thin scratches that invert copper and
    laminate along their path."""
    rng = np.random.default_rng(1000 + i)
    tested = tested.copy()
    for _ in range(6):
        mask = np.zeros_like(tested)
        x0, y0 = (int(v) for v in rng.integers(20, tested.shape[0] - 20, 2))
        angle, length = rng.uniform(0, np.pi), int(rng.integers(30, 60))
        cv2.line(mask, (x0, y0), (int(x0 + length * np.cos(angle)), int(y0 + length * np.sin(angle))), 255, 2)
        tested = np.where(mask > 0, 255 - tested, tested).astype(np.uint8)
    return template, tested


def _new_design(line: Line) -> np.ndarray:
    """A finer-pitch board design: boards drawn at twice the size and scaled down (traces, pads, gaps halved)."""
    size = line.synth.size

    def shrink(template: np.ndarray, tested: np.ndarray, _i: int) -> tuple[np.ndarray, np.ndarray]:
        return (cv2.resize(template, (size, size), interpolation=cv2.INTER_NEAREST),
                cv2.resize(tested, (size, size), interpolation=cv2.INTER_NEAREST))

    return line.crops(line.boards(50, 404, size=2 * size), shrink)


SCENARIOS = ["brightness/contrast", "blur", "new board design", "new defect type", "changed defect rate"]


@pytest.fixture(scope="module")
def same_batch(line: Line) -> np.ndarray:
    return line.crops(line.boards(30, 303))[:BATCH]


def _scenario(name: str, line: Line, same: np.ndarray) -> np.ndarray:
    if name == "brightness/contrast":
        return _brightness_contrast(same)
    if name == "blur":
        return _blur(same)
    if name == "new board design":
        return _new_design(line)[:BATCH]
    if name == "new defect type":
        return line.crops(line.boards(30, 505), _scratches)[:BATCH]
    if name == "changed defect rate":  # 20% of boards with defects instead of all of them
        return line.crops(line.boards(60, 606, defect_rate=0.2))[:BATCH]
    raise AssertionError(name)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_is_detected(name: str, line: Line, reference: Profile, same_batch: np.ndarray) -> None:
    batch = _scenario(name, line, same_batch)
    assert len(batch) >= 150
    report = compare(reference, line.profile(batch), n_perm=N_PERM, seed=0)
    assert report.drifted, f"{name} not detected: " + ", ".join(f"{s.name} p={s.p_value:.2g}" for s in report.signals)


def test_same_distribution_batch_is_not_drift(line: Line, reference: Profile, same_batch: np.ndarray) -> None:
    report = compare(reference, line.profile(same_batch), n_perm=N_PERM, seed=0)
    assert not report.drifted, report.summary()


def test_false_alarm_rate_over_repeated_same_distribution_draws(line: Line, reference: Profile) -> None:
    """100 batches of 200 crops drawn at random from ~1,300 crops of 150 fresh boards of the reference's
    distribution: at most 5% may be called drift (Bonferroni at alpha = 0.01 aims at <= 1%). Measured when written:
    0 of 100."""
    pool = line.profile(line.crops(line.boards(150, 202)))
    rng = np.random.default_rng(7)
    alarms = []
    for i in range(FALSE_ALARM_DRAWS):
        idx = np.sort(rng.choice(pool.size, BATCH, replace=False))
        alarms.append(compare(reference, pool.take(idx), n_perm=N_PERM, seed=i).drifted)
    rate = float(np.mean(alarms))
    print(f"false-alarm rate: {sum(alarms)} of {FALSE_ALARM_DRAWS} same-distribution draws = {rate:.1%}")
    assert rate <= 0.05


def test_profile_round_trip(tmp_path: Path, reference: Profile) -> None:
    save_profile(tmp_path, reference, {"task": "aoi", "input_size": 64})
    back, meta = load_profile(tmp_path)
    assert meta["task"] == "aoi" and back.size == reference.size and back.classes == reference.classes
    np.testing.assert_allclose(back.features, reference.features)
    np.testing.assert_allclose(back.probs, reference.probs, atol=1e-3)  # float16 on disk


# --------------------------------------------------------------------------------------------------- registry + CLI
def _write_pngs(folder: Path, crops: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(crops):
        cv2.imwrite(str(folder / f"{i:04d}.png"), np.ascontiguousarray(c[:, :, ::-1]))  # RGB = tested/template/diff
    return folder


@pytest.fixture(scope="module")
def model_ref(tiny_run: TinyRun) -> str:
    reg = json.loads((tiny_run.root / "registry.json").read_text())
    return f"models:/{reg['registered_model']}/{reg['version']}"


def test_registered_version_carries_its_reference_profile(tiny_run: TinyRun) -> None:
    from defectops.registry.mlflow_registry import client

    reg = json.loads((tiny_run.root / "registry.json").read_text())
    c = client(reg["tracking_uri"])
    names = {a.path for a in c.list_artifacts(reg["mlflow_run_id"], "drift")}
    assert names == {"drift/reference.json", "drift/reference.npz"}
    profile, meta = load_profile(tiny_run.root / "drift")
    assert meta["task"] == "aoi" and meta["dataset_fingerprint"] and meta["data"]["source"] == "synth"
    assert 0 < profile.size <= 2000 and len(profile.embeddings) <= 512 and profile.labels is not None
    assert (tiny_run.root / "drift" / "reference.npz").stat().st_size < 1_000_000


def _invoke(home: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DEFECTOPS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ARGO_SERVER", raising=False)
    return CliRunner().invoke(app, ["drift", "check", *args])


def test_cli_no_drift_then_drift_with_report(tiny_run: TinyRun, model_ref: str, line: Line, same_batch: np.ndarray,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    same = _write_pngs(tmp_path / "same", same_batch)
    r = _invoke(tiny_run.home, ["--model", model_ref, "--images", str(same), "--json"], monkeypatch)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["decision"] == "no drift" and doc["n_batch"] == len(same_batch) and len(doc["signals"]) == 15
    blurred = _write_pngs(tmp_path / "blur", _blur(same_batch))
    html = tmp_path / "drift.html"
    r = _invoke(tiny_run.home, ["--model", model_ref, "--images", str(blurred), "--report", str(html)],
                monkeypatch)
    assert r.exit_code == 3, r.output
    assert "DRIFT" in r.stdout and "sharpness (tested)" in r.stdout
    text = html.read_text()
    assert text.count("<img") == 5 and "data:image/png;base64," in text and "<script" not in text


def test_cli_reads_images_from_s3(tiny_run: TinyRun, model_ref: str, same_batch: np.ndarray, s3: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--images s3://bucket/prefix`` through the project's S3 client, against the real SeaweedFS test server."""
    c = s3.client()
    if "drift-batches" not in {b["Name"] for b in c.list_buckets()["Buckets"]}:
        c.create_bucket(Bucket="drift-batches")
    for i, x in enumerate(same_batch[:60]):
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(x[:, :, ::-1]))
        assert ok
        c.put_object(Bucket="drift-batches", Key=f"line-4/2026-11-26/{i:03d}.png", Body=buf.tobytes())
    c.put_object(Bucket="drift-batches", Key="line-4/2026-11-26/notes.txt", Body=b"not an image")
    for k, v in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
                 "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": s3.region}.items():
        monkeypatch.setenv(k, v)
    r = _invoke(tiny_run.home, ["--model", model_ref, "--images", "s3://drift-batches/line-4/2026-11-26",
                                   "--json"], monkeypatch)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_batch"] == 60


def test_cli_usage_errors(tiny_run: TinyRun, model_ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tiny_run.home
    assert _invoke(home, ["--model", "models:/nope@champion", "--images", str(tmp_path)], monkeypatch).exit_code == 2
    assert _invoke(home, ["--model", model_ref, "--images", str(tmp_path / "missing")], monkeypatch).exit_code == 2
    (tmp_path / "empty").mkdir()
    assert _invoke(home, ["--model", model_ref, "--images", str(tmp_path / "empty")], monkeypatch).exit_code == 2
    assert _invoke(home, ["--model", model_ref, "--images", str(tmp_path), "--alpha", "2"], monkeypatch).exit_code == 2
    r = CliRunner().invoke(app, ["drift", "check", "--help"])
    assert "0 no drift, 3 drift (and" in " ".join(r.stdout.split())


# --------------------------------------------------------------------------------------------------- Argo + CI
def _argo_validator() -> Any:
    from argo_schema import schema_path, validator

    path = schema_path()
    if not path.is_file():
        pytest.skip(f"Argo JSON schema not found at {path}: set DEFECTOPS_ARGO_SCHEMA to validate the Argo objects")
    return validator(str(path))


def test_submit_retrain_dry_run_prints_a_valid_workflow(tiny_run: TinyRun, model_ref: str, same_batch: np.ndarray,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    validate = _argo_validator()
    blurred = _write_pngs(tmp_path / "blur", _blur(same_batch))
    r = _invoke(tiny_run.home, ["--model", model_ref, "--images", str(blurred), "--json", "--submit-retrain",
                                   "--retrain-data", "s3://acme-datasets/aoi@" + "ab" * 32], monkeypatch)
    assert r.exit_code == 3, r.output
    doc = json.loads(r.stdout)
    retrain = doc["retrain"]
    assert retrain["dry_run"] and not retrain["submitted"]
    wf = retrain["manifest"]
    validate(wf, "Workflow")
    assert wf["spec"]["workflowTemplateRef"]["name"] == "defectops-pipeline"
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params["overrides"] == "data=snapshot data.root=s3://acme-datasets/aoi@" + "ab" * 32
    assert wf["metadata"]["labels"]["defectops.io/trigger"] == "drift"
    note = json.loads(wf["metadata"]["annotations"]["defectops.io/drift-report"])
    assert note["decision"] == "drift" and "sharpness (tested)" in note["drifted"]
    assert "kind: Workflow" in r.stderr  # the dry run prints the manifest (on stderr with --json)


def test_cronworkflow_validates_against_the_argo_schema() -> None:
    validate = _argo_validator()
    doc = yaml.safe_load((REPO / "deploy" / "argo" / "cron" / "drift-cronworkflow.yaml").read_text())
    validate(doc, "CronWorkflow")
    spec = doc["spec"]["workflowSpec"]
    assert spec["serviceAccountName"] == "defectops-workflow"
    args = spec["templates"][0]["container"]["args"][0]
    assert "defectops drift check" in args and "--submit-retrain" in args and "3)" in args


def test_github_workflow_validates_against_its_schema() -> None:
    """Against SchemaStore's github-workflow schema as vendored by check-jsonschema (no network here)."""
    import jsonschema

    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test dependency) vendors the schema")
    from importlib.resources import files

    schema = json.loads((files("check_jsonschema") / "builtin_schemas" / "vendor" / "github-workflows.json")
                        .read_text())
    text = (REPO / ".github" / "workflows" / "drift.yml").read_text()
    doc = yaml.safe_load(text)
    doc["on"] = doc.pop(True)  # PyYAML reads the key `on` as YAML 1.1's boolean; GitHub (YAML 1.2) as a string
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    assert not errors, "\n".join(e.message[:200] for e in errors[:10])
    assert "schedule" in doc["on"] and "workflow_dispatch" in doc["on"]
    run = " ".join(s.get("run", "") for s in doc["jobs"]["check"]["steps"])
    assert "defectops drift check" in run and "--submit-retrain" in run and "3)" in run
