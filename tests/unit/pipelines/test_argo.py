"""The pipeline on Argo, offline: `defectops compile | submit | status` (pipelines/argo/, pipelines/cli/argo.py).

No Argo controller or Kubernetes API server can run here, so:

* golden YAML: `defectops compile` output is compared byte for byte with tests/golden/argo/<case>.yaml and, for the
  default case, with the committed deploy/argo/. Regenerate on purpose with
  ``DEFECTOPS_REGEN_GOLDEN=1 pytest tests/unit/pipelines/test_argo.py`` and review the diff.
* every Argo object (WorkflowTemplate, the submitted Workflow and the request body, the artifact repository) is
  validated against Argo's official JSON schema (v3.6.19) made strict (``additionalProperties: false`` on every object
  definition), from ``$DEFECTOPS_ARGO_SCHEMA`` (default ../shared/schemas/argo-workflows-v3.6.19.schema.json); those
  tests skip with that reason when the file is absent. Every Kubernetes object is validated with
  kubernetes-validate in strict mode.
* the semantics: one template per DAG step in DAG order, the GPU pool conventions shared with terraform/ and
  deploy/helm/, requests/limits everywhere, non-root and read-only root filesystems, IRSA and no AWS keys, which
  failures are retried, the exit handler's message, the shell that splits the overrides, the torchrun command line.
* submit/status run against a tiny fake Argo Server (http.server on loopback, plain and TLS) that stands in for what
  cannot run here; it answers 200/401/403/404/409 and its port can be closed.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from argo_schema import SCHEMA_ENV, schema_path, validator
from repo_paths import REPO
from typer.testing import CliRunner

from defectops.pipelines.argo import compiler as A
from defectops.pipelines.cli import app
from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_GATES, EXIT_USAGE

GOLDEN = REPO / "tests" / "golden" / "argo"
DEPLOY = REPO / "deploy" / "argo"
REGEN = os.environ.get("DEFECTOPS_REGEN_GOLDEN") == "1"
KUBE_VERSIONS = ("1.29.0", "1.31.0")
ARGO_KINDS = {"WorkflowTemplate", "Workflow"}
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "accessKeySecret",
               "secretKeySecret", "secretKeyRef")
# The Terraform GPU node group (label + taint) and the Helm chart use the same conventions
# (tests/unit/deploy/test_helm_chart.py).
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}

ROLE = "arn:aws:iam::210987654321:role/acme-defectops-workflow"
CASES: dict[str, list[str]] = {
    # `defectops compile` with every default: what deploy/argo/ holds.
    "default": [],
    # A production-like render: 4 GPUs with torchrun, an MLflow server, real names.
    "ddp-4gpu": ["train.nproc=4", "registry.tracking_uri=https://mlflow.acme.example", "train.epochs=30",
                 "--namespace", "ml-prod", "--bucket", "acme-defectops-runs", "--prefix", "aoi/line-4/",
                 "--artifact-bucket", "acme-argo-logs", "--region", "eu-west-1", "--role-arn", ROLE,
                 "--image", "210987654321.dkr.ecr.eu-west-1.amazonaws.com/defectops", "--tag", "1.4.2",
                 "--retries", "3", "--deadline-hours", "48", "--template-name", "aoi-pipeline"],
}


# --- schema helpers ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def argo_schema() -> Any:
    """validate(obj, definition) against the strict Argo schema; skips when the schema file is absent."""
    path = schema_path()
    if not path.is_file():
        pytest.skip(f"Argo JSON schema not found at {path}: set {SCHEMA_ENV} to argo-workflows-v3.6.19.schema.json "
                    f"(api/jsonschema/schema.json of the Argo Workflows release) to validate the Argo objects")
    return validator(str(path))


@pytest.fixture
def argo_schema_if_present() -> Any:
    """The strict validator when the schema is there, else a no-op (the fake-server tests still run)."""
    path = schema_path()
    if not path.is_file():
        return lambda obj, definition: None
    return validator(str(path))


def _k8s_validate(obj: dict[str, Any]) -> None:
    for v in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, v, strict=True)


# --- compiling via the CLI ----------------------------------------------------------------------------------------

def _compile(args: list[str], out: Path) -> dict[str, str]:
    r = CliRunner().invoke(app, ["compile", *args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.yaml"))}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    return {case: _compile(args, tmp_path_factory.mktemp(case)) for case, args in CASES.items()}


def _docs(files: dict[str, str]) -> list[dict[str, Any]]:
    return [d for text in files.values() for d in yaml.safe_load_all(text) if d]


def _wt(files: dict[str, str]) -> dict[str, Any]:
    [wt] = [d for d in _docs(files) if d["kind"] == "WorkflowTemplate"]
    return wt


def _templates(wt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def _steps() -> list[str]:
    from defectops.pipelines.dag import STEP_NAMES

    return list(STEP_NAMES)


# --- golden files --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_compile_matches_golden(compiled: dict[str, dict[str, str]], case: str) -> None:
    bundle = A.render_bundle(compiled[case])
    golden = GOLDEN / f"{case}.yaml"
    if REGEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(bundle, encoding="utf-8")
    assert golden.is_file(), f"{golden} missing: run DEFECTOPS_REGEN_GOLDEN=1 pytest tests/unit/pipelines/test_argo.py"
    assert golden.read_text(encoding="utf-8") == bundle, (
        f"`defectops compile` output changed for case {case!r}. If the change is intended, regenerate with "
        "DEFECTOPS_REGEN_GOLDEN=1 pytest tests/unit/pipelines/test_argo.py and review the diff of tests/golden/ and "
        "deploy/argo/")


def test_deploy_argo_is_the_default_compile(compiled: dict[str, dict[str, str]], tmp_path: Path) -> None:
    files = compiled["default"]
    if REGEN:
        DEPLOY.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (DEPLOY / name).write_text(text, encoding="utf-8")
    committed = {p.name: p.read_text(encoding="utf-8") for p in sorted(DEPLOY.glob("*.yaml"))}
    assert committed == files, ("deploy/argo/ is stale: regenerate with DEFECTOPS_REGEN_GOLDEN=1 pytest "
                                "tests/unit/pipelines/test_argo.py (or defectops compile --out deploy/argo)")
    r = CliRunner().invoke(app, ["compile", "--check", "--out", str(DEPLOY)])
    assert r.exit_code == 0 and "up to date" in r.output, r.output
    (tmp_path / "40-workflow-template.yaml").write_text("stale", encoding="utf-8")
    r = CliRunner().invoke(app, ["compile", "--check", "--out", str(tmp_path)])
    assert r.exit_code == EXIT_FAILURE and "out of date" in r.output
    assert (tmp_path / "40-workflow-template.yaml").read_text() == "stale"  # --check writes nothing


# --- schemas ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_argo_objects_validate_strictly(compiled: dict[str, dict[str, str]], case: str, argo_schema: Any) -> None:
    docs = _docs(compiled[case])
    argo_docs = [d for d in docs if d["kind"] in ARGO_KINDS]
    assert [d["kind"] for d in argo_docs] == ["WorkflowTemplate"]
    argo_schema(argo_docs[0], "WorkflowTemplate")
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    repo = yaml.safe_load(cm["data"][A.ARTIFACT_REPO_KEY])
    argo_schema(repo, "ArtifactRepository")


def test_strict_schema_catches_typos_and_wrong_types(compiled: dict[str, dict[str, str]], argo_schema: Any) -> None:
    wt = _wt(compiled["default"])
    typo = copy.deepcopy(wt)
    typo["spec"]["templates"][0]["retryStrategy"]["retryPolcy"] = "Always"
    with pytest.raises(AssertionError, match="retryPolcy"):
        argo_schema(typo, "WorkflowTemplate")
    wrong = copy.deepcopy(wt)
    wrong["spec"]["templates"][0]["retryStrategy"]["limit"] = 2  # IntOrString is a string in this schema
    with pytest.raises(AssertionError, match="limit"):
        argo_schema(wrong, "WorkflowTemplate")
    nested = copy.deepcopy(wt)
    nested["spec"]["templates"][0]["container"]["resources"]["limit"] = {"cpu": "1"}
    with pytest.raises(AssertionError, match="limit"):
        argo_schema(nested, "WorkflowTemplate")


@pytest.mark.parametrize("case", list(CASES))
def test_kubernetes_objects_validate_strictly(compiled: dict[str, dict[str, str]], case: str) -> None:
    docs = [d for d in _docs(compiled[case]) if d["kind"] not in ARGO_KINDS]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Namespace", "PriorityClass", "Role", "Role",
                                                "RoleBinding", "RoleBinding", "Secret", "ServiceAccount",
                                                "ServiceAccount"]
    for d in docs:
        _k8s_validate(d)
    bad = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceAccount"))
    bad["metadata"]["anotations"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.31.0", strict=True)


def test_every_pod_spec_of_the_template_is_a_valid_kubernetes_container(compiled: dict[str, dict[str, str]]) -> None:
    """Argo's schema embeds Kubernetes types; check each container and volume against Kubernetes' own schema too."""
    for case in CASES:
        wt = _wt(compiled[case])
        for t in wt["spec"]["templates"]:
            if "container" not in t:
                continue
            c = {"name": "main", **t["container"]}
            c["image"] = "defectops:0.1.0"
            pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": t["name"]},
                   "spec": {"containers": [c], "volumes": t.get("volumes", []),
                            "securityContext": wt["spec"]["securityContext"],
                            "nodeSelector": t.get("nodeSelector", {}), "tolerations": t.get("tolerations", []),
                            "priorityClassName": t.get("priorityClassName"),
                            "serviceAccountName": wt["spec"]["serviceAccountName"]}}
            if pod["spec"]["priorityClassName"] is None:
                del pod["spec"]["priorityClassName"]
            _k8s_validate(pod)


# --- semantics -------------------------------------------------------------------------------------------------------

def test_one_template_per_dag_step_in_dag_order(compiled: dict[str, dict[str, str]]) -> None:
    steps = _steps()
    for case in CASES:
        wt = _wt(compiled[case])
        spec = wt["spec"]
        assert spec["entrypoint"] == A.ENTRYPOINT
        dag = _templates(wt)[A.ENTRYPOINT]["dag"]["tasks"]
        assert [t["name"] for t in dag] == [s.replace("_", "-") for s in steps]
        for i, task in enumerate(dag):
            assert task["template"] == task["name"]
            assert task.get("depends") == (dag[i - 1]["name"] if i else None)
            tmpl = _templates(wt)[task["template"]]
            argv = tmpl["container"]["command"] + tmpl["container"]["args"]
            assert steps[i] in argv and A.RUN_ROOT in argv
            assert "step" in argv or "step" in argv[2]
        step_templates = {t["name"] for t in spec["templates"] if "container" in t} - {A.REPORT_TEMPLATE}
        assert step_templates == {s.replace("_", "-") for s in steps}


def test_edges_follow_the_dag_definition() -> None:
    from defectops.pipelines.dag import DAG

    e = A.edges(DAG)
    assert e[DAG[0].name] == [] and all(e[s.name] == [DAG[i].name] for i, s in enumerate(DAG[1:]))
    sub = DAG[:3]  # a different DAG compiles to a different template: nothing is hard-coded
    wt = A.workflow_template(A.ArgoSettings(steps=sub))
    assert [t["name"] for t in _templates(wt)[A.ENTRYPOINT]["dag"]["tasks"]] == ["pull-data", "validate-data",
                                                                                   "train"]
    with pytest.raises(A.CompileError, match="train"):
        A.workflow_template(A.ArgoSettings(steps=DAG[:2]))


def test_parameters_run_root_and_overrides(compiled: dict[str, dict[str, str]]) -> None:
    wt = _wt(compiled["ddp-4gpu"])
    params = {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}
    assert params["image"] == "210987654321.dkr.ecr.eu-west-1.amazonaws.com/defectops" and params["tag"] == "1.4.2"
    assert params["bucket"] == "acme-defectops-runs" and params["prefix"] == "aoi/line-4"
    assert params["base-overrides"] == "train.nproc=4 registry.tracking_uri=https://mlflow.acme.example train.epochs=30"
    assert params["overrides"] == ""
    assert A.RUN_ROOT == "s3://{{workflow.parameters.bucket}}/{{workflow.parameters.prefix}}/{{workflow.name}}"
    for t in wt["spec"]["templates"]:
        if "container" in t:
            assert t["container"]["image"] == "{{workflow.parameters.image}}:{{workflow.parameters.tag}}"
    first = _templates(wt)["pull-data"]["container"]
    env = {e["name"]: e["value"] for e in first["env"]}
    assert env["DEFECTOPS_BASE_OVERRIDES"] == "{{workflow.parameters.base-overrides}}"
    assert env["DEFECTOPS_OVERRIDES"] == "{{workflow.parameters.overrides}}"
    for name in ("validate-data", "train", "evaluate", "register", "export", "verify-export"):
        names = {e["name"] for e in _templates(wt)[name]["container"]["env"]}
        assert "DEFECTOPS_OVERRIDES" not in names  # later steps read the config pinned in the run root


def test_first_step_shell_splits_overrides_without_evaluating_them(compiled: dict[str, dict[str, str]],
                                                                   tmp_path: Path) -> None:
    """Run the first step's real command line with a stand-in `defectops` that prints its argv."""
    c = _templates(_wt(compiled["default"]))["pull-data"]["container"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "defectops"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    marker = tmp_path / "pwned"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "DEFECTOPS_BASE_OVERRIDES": "train.epochs=5 model=vit",
           "DEFECTOPS_OVERRIDES": f"train.epochs=7 data.root=s3://b/p/* $(touch${{IFS}}{marker}) `id`"}
    argv = [*c["command"], *[a.replace("{{workflow.parameters.bucket}}", "b") for a in c["args"]]]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    got = json.loads(out)
    root = "s3://b/{{workflow.parameters.prefix}}/{{workflow.name}}"
    assert got == ["step", "pull_data", "--run-root", root, "train.epochs=5", "model=vit", "train.epochs=7",
                   "data.root=s3://b/p/*", f"$(touch${{IFS}}{marker})", "`id`"]
    assert not marker.exists()
    env["DEFECTOPS_BASE_OVERRIDES"] = env["DEFECTOPS_OVERRIDES"] = ""
    assert json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout) == \
        ["step", "pull_data", "--run-root", root]


def test_step_command_lines_parse_with_the_real_cli(compiled: dict[str, dict[str, str]]) -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    for case in CASES:
        for t in _wt(compiled[case])["spec"]["templates"]:
            if "container" not in t:
                continue
            c = t["container"]
            if c["command"][0] == "/bin/sh":
                argv = ["step", c["args"][1], "--run-root", c["args"][2], "train.epochs=3"]
            elif c["command"][0] == "torchrun":
                argv = c["args"][c["args"].index("defectops") + 1:]
            else:
                assert c["command"] == ["defectops"]
                argv = c["args"]
            cmd = group.commands[argv[0]]
            ctx = cmd.make_context(argv[0], list(argv[1:]))
            if argv[0] == "step":
                assert ctx.params["name"] in _steps()
                assert ctx.params["run_root"] is not None


def test_train_runs_on_the_gpu_pool(compiled: dict[str, dict[str, str]]) -> None:
    for case, gpus in (("default", 1), ("ddp-4gpu", 4)):
        wt = _wt(compiled[case])
        assert wt["metadata"]["annotations"][A.TEMPLATE_NPROC_ANNOTATION] == str(gpus)
        t = _templates(wt)["train"]
        res = t["container"]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(gpus)
        assert t["nodeSelector"] == GPU_NODE_LABEL
        assert t["tolerations"] == [GPU_TOLERATION]
        assert t["priorityClassName"] == "defectops-training"
        shm = next(v for v in t["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{2 * gpus}Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in t["container"]["volumeMounts"]
        # memory-backed /dev/shm counts against the memory limit: it must fit
        assert int(res["limits"]["memory"].removesuffix("Gi")) > 2 * gpus
        for name, other in _templates(wt).items():
            if name != "train" and "container" in other:
                assert "nvidia.com/gpu" not in json.dumps(other["container"]["resources"])
                assert "tolerations" not in other and "nodeSelector" not in other
    [pc] = [d for d in _docs(compiled["default"]) if d["kind"] == "PriorityClass"]
    assert pc["metadata"]["name"] == "defectops-training" and pc["preemptionPolicy"] == "Never"


def test_train_command_single_process_and_ddp(compiled: dict[str, dict[str, str]]) -> None:
    """One process or N: the pod runs `defectops step train`; with train.nproc=N pinned in the run root's config the
    step mirrors the s3:// run root once and starts torchrun itself (tests/integration/test_distributed.py runs that
    path)."""
    for case, gpus in (("default", None), ("ddp-4gpu", "4")):
        c = _templates(_wt(compiled[case]))["train"]["container"]
        assert c["command"] == ["defectops"] and c["args"] == ["step", "train", "--run-root", A.RUN_ROOT]
        assert c["resources"]["limits"].get("nvidia.com/gpu") == (gpus or c["resources"]["limits"].get(
            "nvidia.com/gpu"))


def test_resources_security_and_volumes_everywhere(compiled: dict[str, dict[str, str]]) -> None:
    for case in CASES:
        wt = _wt(compiled[case])
        pod_sc = wt["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 1000 and pod_sc["fsGroup"] == 1000
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        containers = [t for t in wt["spec"]["templates"] if "container" in t]
        assert len(containers) == len(_steps()) + 1
        for t in containers:
            c = t["container"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory", "ephemeral-storage"} <= set(c["resources"][kind]), (t["name"], kind)
            assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            vols = {v["name"]: v for v in t["volumes"]}
            assert mounts["/tmp"] == "tmp" and mounts[A.HOME] == "home"
            assert all("emptyDir" in vols[n] and vols[n]["emptyDir"].get("sizeLimit") for n in mounts.values())
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["HOME"] == A.HOME and env["DEFECTOPS_HOME"].startswith(A.HOME + "/")
            if t["name"] != A.REPORT_TEMPLATE:
                assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_workflow_lifecycle_and_artifact_repository(compiled: dict[str, dict[str, str]]) -> None:
    docs = _docs(compiled["ddp-4gpu"])
    spec = _wt(compiled["ddp-4gpu"])["spec"]
    assert spec["podGC"] == {"strategy": "OnPodSuccess"}
    assert spec["ttlStrategy"] == {"secondsAfterSuccess": 86400, "secondsAfterFailure": 604800}
    assert spec["activeDeadlineSeconds"] == 48 * 3600
    assert spec["serviceAccountName"] == "defectops-workflow"
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert spec["artifactRepositoryRef"] == {"configMap": cm["metadata"]["name"], "key": A.ARTIFACT_REPO_KEY}
    assert cm["metadata"]["namespace"] == "ml-prod"
    assert cm["metadata"]["annotations"]["workflows.argoproj.io/default-artifact-repository"] == A.ARTIFACT_REPO_KEY
    s3 = yaml.safe_load(cm["data"][A.ARTIFACT_REPO_KEY])["s3"]
    assert s3["bucket"] == "acme-argo-logs" and s3["useSDKCreds"] is True and s3["region"] == "eu-west-1"
    assert s3["endpoint"] == "s3.eu-west-1.amazonaws.com" and s3["insecure"] is False
    for t in spec["templates"]:
        if "container" in t and t["name"] != A.REPORT_TEMPLATE:
            assert t["retryStrategy"]["limit"] == "3"


def test_irsa_and_no_static_keys(compiled: dict[str, dict[str, str]]) -> None:
    for case in CASES:
        text = A.render_bundle(compiled[case])
        for secret in AWS_SECRETS:
            assert secret not in text, (case, secret)
        docs = _docs(compiled[case])
        sas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        role_arn = sas["defectops-workflow"]["metadata"]["annotations"][A.IRSA_ANNOTATION]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", role_arn)
        assert "annotations" not in sas["defectops-submitter"]["metadata"] or \
            A.IRSA_ANNOTATION not in sas["defectops-submitter"]["metadata"]["annotations"]
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
        bindings = [d for d in docs if d["kind"] == "RoleBinding"]
        for b in bindings:
            assert b["roleRef"]["name"] in roles
            assert b["subjects"][0]["name"] in sas
        executor = roles["defectops-workflow-executor"]["rules"]
        assert executor == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                             "verbs": ["create", "patch"]}]
        assert not any("*" in r["verbs"] or "delete" in r["verbs"] for role in roles.values() for r in role["rules"])
    assert "arn:aws:iam::210987654321:role/acme-defectops-workflow" in A.render_bundle(compiled["ddp-4gpu"])


def _expr_to_python(expr: str) -> str:
    """Translate the (small) expr-lang subset RETRY_EXPRESSION uses into Python, to test its logic."""
    py = expr.replace("||", " or ").replace("&&", " and ").replace("!(", " not (")
    py = re.sub(r"asInt\(lastRetry\.exitCode\)", "int(exit_code)", py)
    py = re.sub(r'lastRetry\.message contains ("[^"]*")', r"(\1 in message)", py)
    py = py.replace("lastRetry.status", "status")
    assert "lastRetry" not in py, py
    return py


@pytest.mark.parametrize(("status", "exit_code", "message", "retried"), [
    ("Error", "-1", "pod deleted", True),                              # node lost / preempted / evicted
    ("Error", "0", "failed to save outputs: timeout", True),           # the wait container failed
    ("Failed", "-1", "", True),                                        # killed without an exit code
    ("Failed", "143", "Error (exit code 143)", True),                  # SIGTERM: spot interruption
    ("Failed", "137", "Error (exit code 137)", True),                  # SIGKILL from outside
    ("Failed", "137", "OOMKilled (exit code 137)", False),             # OOM: the same limits would fail again
    ("Failed", "3", "error: step register failed: gates failed", False),  # gate failure: never retried
    ("Failed", "1", "error: step train failed: ...", False),           # the step failed on its own
    ("Failed", "2", "error: bad configuration", False),                # usage/config error
])
def test_retry_expression_retries_only_infrastructure(status: str, exit_code: str, message: str,
                                                      retried: bool) -> None:
    assert eval(_expr_to_python(A.RETRY_EXPRESSION), {}, {  # our own constant, translated
        "status": status, "exit_code": exit_code, "message": message}) is retried


def test_exit_handler_reports_failures(compiled: dict[str, dict[str, str]]) -> None:
    wt = _wt(compiled["default"])
    assert wt["spec"]["onExit"] == A.EXIT_HANDLER
    handler = _templates(wt)[A.EXIT_HANDLER]["dag"]["tasks"]
    assert handler == [{"name": "report", "template": A.REPORT_TEMPLATE, "when": "{{workflow.status}} != Succeeded"}]
    report = _templates(wt)[A.REPORT_TEMPLATE]["container"]
    assert report["args"][:2] == ["argo-report", "--workflow"] and "{{workflow.failures}}" in report["args"]
    assert "retryStrategy" not in _templates(wt)[A.REPORT_TEMPLATE]


GATE_LOG = ("  ✓ evaluate in 3.1 s\nerror: step register failed: gates failed, version 4 registered without "
            "'challenger': macro_recall 0.81 < 0.9")
FAILURES = json.dumps([
    {"displayName": "defectops-x1", "message": "child 'defectops-x1-1' failed", "templateName": "pipeline",
     "phase": "Failed", "podName": "defectops-x1"},
    {"displayName": "register", "message": GATE_LOG, "templateName": "register", "phase": "Failed",
     "podName": "defectops-x1-register-1"},
    {"displayName": "register(0)", "message": GATE_LOG, "templateName": "register", "phase": "Failed",
     "podName": "defectops-x1-register-2"},
])


def test_failure_report_names_a_gate_failure() -> None:
    text, gate = A.failure_report("defectops-x1", "Failed", FAILURES, "s3://b/runs/defectops-x1")
    assert gate
    lines = text.splitlines()
    assert lines[0] == "DefectOps workflow defectops-x1 Failed."
    assert lines[1].startswith("GATE FAILURE in step register:") and "macro_recall 0.81 < 0.9" in lines[1]
    assert "never retried" in lines[1] and lines[-1].startswith("Run root: s3://b/runs/defectops-x1")
    assert len(lines) == 3  # the DAG node and the duplicate retry child are not reported
    step = json.dumps([{"templateName": "train", "phase": "Failed", "message": "x\nerror: step train failed: boom"}])
    text, gate = A.failure_report("w", "Failed", step)
    assert not gate and "Step train failed (not retried" in text and "boom" in text
    infra = json.dumps([{"templateName": "export", "phase": "Error", "message": "pod deleted"}])
    assert "in the infrastructure" in A.failure_report("w", "Error", infra)[0]
    assert "No step failed" in A.failure_report("w", "Failed", "null")[0]
    assert "No step failed" in A.failure_report("w", "Failed", "not json")[0]
    r = CliRunner().invoke(app, ["argo-report", "--workflow", "defectops-x1", "--status", "Failed",
                                 "--failures", FAILURES, "--run-root", "s3://b/runs/defectops-x1"])
    assert r.exit_code == 0 and "GATE FAILURE in step register" in r.output


def test_classify() -> None:
    assert A.classify("anything", "3") == "gates"
    assert A.classify("Error (exit code 3)") == "gates"
    assert A.classify(GATE_LOG) == "gates"
    assert A.classify("error: step train failed: x", "1") == "step"
    assert A.classify("OOMKilled (exit code 137)") == "infrastructure"
    assert A.classify("pod deleted") == "infrastructure"


def test_compile_rejects_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    for args, fragment in ((["--role-arn", "AKIAIOSFODNN7EXAMPLE"], "role ARN"),
                           (["--bucket", "Bad_Bucket"], "bucket"), (["--prefix", "/runs/"], "prefix"),
                           (["--namespace", "Prod"], "namespace"), (["train.nproc=0"], "nproc"),
                           (["train.epochz=3"], "bad configuration")):
        r = runner.invoke(app, ["compile", *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == EXIT_USAGE, (args, r.output)
        assert fragment in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(A.CompileError):
        A.check_overrides(["run.name=two words"])


# --- the Dockerfile ------------------------------------------------------------------------------------------------

def test_dockerfile_multistage_pinned_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    froms = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, flags=re.M)
    assert len(froms) >= 2 and froms[0][1] == "builder" and froms[-1][1] == "runtime"
    for image, _ in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.search(r"@sha256:[0-9a-f]{64}$", image) or re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image), \
            f"base image {image} is not pinned to an exact version or digest"
    runtime = text[text.rindex("FROM "):]
    users = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == str(A.UID)  # the uid the templates run as
    assert re.search(r'^ENTRYPOINT \["defectops"\]', runtime, flags=re.M)
    volume = re.search(r"^VOLUME (.+)$", runtime, flags=re.M)
    assert f"HOME={A.HOME}" in runtime and volume and A.HOME in volume.group(1)
    assert "from=builder" in runtime and "requirements.lock" in text  # wheels come from the builder
    assert not re.search(r"AWS_(ACCESS|SECRET)", text)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "defectops-home", "tests"} <= set(ignored)


# --- submit and status against a fake Argo Server -----------------------------------------------------------------

TOKEN = "s3cr3t-token"


class FakeArgo:
    """Stands in for the Argo Server's REST API (what cannot run here): records requests, answers like Argo."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}
        self.workflows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.fail: dict[str, tuple[int, str]] = {}  # route -> (status, message)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append({"method": method, "path": self.path, "auth": self.headers.get("Authorization"),
                                      "body": body})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"code": 16, "message": "token not valid. see https://argo-workflows."
                                                                   "readthedocs.io/en/latest/faq/"})
                parts = self.path.strip("/").split("/")
                route = {("GET", "workflow-templates"): "template", ("POST", "workflows"): "create",
                         ("GET", "workflows"): "get"}.get((method, parts[2] if len(parts) > 2 else ""), "?")
                if route in fake.fail:
                    code, msg = fake.fail[route]
                    return self._send(code, {"code": 7, "message": msg})
                if route == "template":
                    t = fake.templates.get((parts[3], parts[4]))
                    return self._send(200, t) if t else self._send(404, {"code": 5, "message":
                        f'workflowtemplates.argoproj.io "{parts[4]}" not found'})
                if route == "create":
                    assert body is not None
                    wf = copy.deepcopy(body["workflow"])
                    wf["metadata"]["name"] = wf["metadata"].pop("generateName") + "abc12"
                    return self._send(200, wf)
                if route == "get":
                    answers = fake.workflows.get((parts[3], parts[4]))
                    if not answers:
                        return self._send(404, {"code": 5, "message": "not found"})
                    return self._send(200, answers.pop(0) if len(answers) > 1 else answers[0])
                return self._send(404, {"code": 5, "message": "Not Found"})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def argo_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeArgo]:
    fake = FakeArgo()
    base = A.ArgoSettings(overrides=("registry.tracking_uri=http://mlflow.mlflow:5000",))
    fake.templates[("defectops", "defectops-pipeline")] = A.workflow_template(base)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ARGO_INSECURE_SKIP_VERIFY",
              "ARGO_CA_BUNDLE", "ARGO_NAMESPACE", "ARGO_SECURE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ARGO_SERVER", fake.url)
    monkeypatch.setenv("ARGO_TOKEN", TOKEN)
    monkeypatch.setenv("DEFECTOPS_USER", "alice@acme")
    yield fake
    fake.close()


def _one_line_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output and TOKEN not in output
    return lines[0]


def test_submit_creates_a_workflow_from_the_template(argo_env: FakeArgo, argo_schema_if_present: Any) -> None:
    argo_schema = argo_schema_if_present
    r = CliRunner().invoke(app, ["submit", "train.epochs=3", "model=vit", "--tag", "0.2.0"])
    assert r.exit_code == 0, r.output
    assert "submitted defectops-abc12" in r.output
    assert f"{argo_env.url}/workflows/defectops/defectops-abc12" in r.output
    get, post = argo_env.requests
    assert get["method"] == "GET" and get["path"] == "/api/v1/workflow-templates/defectops/defectops-pipeline"
    assert post["method"] == "POST" and post["path"] == "/api/v1/workflows/defectops"
    assert post["auth"] == f"Bearer {TOKEN}"
    body = post["body"]
    argo_schema(body, "WorkflowCreateRequest")
    argo_schema(body["workflow"], "Workflow")
    wf = body["workflow"]
    assert wf["spec"]["workflowTemplateRef"] == {"name": "defectops-pipeline"}
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params == {"tag": "0.2.0", "overrides": "train.epochs=3 model=vit", "submitted-by": "alice@acme"}
    assert wf["metadata"]["labels"]["defectops.io/submitted-by"] == "alice-acme"


def test_submit_dry_run_prints_the_manifest(argo_env: FakeArgo, argo_schema_if_present: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    argo_schema = argo_schema_if_present
    monkeypatch.delenv("ARGO_SERVER")
    r = CliRunner().invoke(app, ["submit", "train.epochs=3", "--dry-run", "-n", "ml-prod"])
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load(r.output)
    argo_schema(manifest, "Workflow")
    assert manifest["metadata"]["namespace"] == "ml-prod" and manifest["kind"] == "Workflow"
    assert argo_env.requests == []
    r = CliRunner().invoke(app, ["submit", "train.epochz=3", "--dry-run"])
    assert r.exit_code == EXIT_USAGE and "bad configuration" in r.output


@pytest.mark.parametrize(("setup", "code", "fragments"), [
    ("bad-token", EXIT_FAILURE, ("401 Unauthorized", "ARGO_TOKEN", "token not valid")),
    ("forbidden", EXIT_FAILURE, ("403 Forbidden", "create workflows in namespace defectops", "cannot create")),
    ("conflict", EXIT_FAILURE, ("conflict (409)", "already exists")),
    ("no-template", EXIT_FAILURE, ("WorkflowTemplate defectops-pipeline not found in namespace defectops",
                                   "kubectl apply")),
    ("server-error", EXIT_FAILURE, ("(500)", "etcd")),
    ("closed-port", EXIT_FAILURE, ("cannot reach Argo Server", "connection refused")),
    ("no-server", EXIT_USAGE, ("ARGO_SERVER is not set",)),
    ("nproc-mismatch", EXIT_USAGE, ("compiled for 1 GPU(s)", "defectops compile train.nproc=2")),
    ("local-registry", EXIT_USAGE, ("registry.tracking_uri",)),
])
def test_submit_errors_are_one_line(argo_env: FakeArgo, monkeypatch: pytest.MonkeyPatch, setup: str, code: int,
                                    fragments: tuple[str, ...]) -> None:
    args = ["submit", "train.epochs=3"]
    if setup == "bad-token":
        monkeypatch.setenv("ARGO_TOKEN", "wrong")
    elif setup == "forbidden":
        argo_env.fail["create"] = (403, 'workflows.argoproj.io is forbidden: User "system:serviceaccount:defectops:'
                                        'viewer" cannot create resource "workflows"')
    elif setup == "conflict":
        argo_env.fail["create"] = (409, 'workflows.argoproj.io "defectops-abc12" already exists')
    elif setup == "no-template":
        argo_env.templates.clear()
    elif setup == "server-error":
        argo_env.fail["create"] = (500, "etcdserver: request timed out")
    elif setup == "closed-port":
        port = argo_env.server.server_address[1]
        argo_env.close()
        monkeypatch.setenv("ARGO_SERVER", f"http://127.0.0.1:{port}")
    elif setup == "no-server":
        monkeypatch.delenv("ARGO_SERVER")
    elif setup == "nproc-mismatch":
        args.append("train.nproc=2")
    elif setup == "local-registry":
        args.append("registry.tracking_uri=null")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, r.output
    line = _one_line_error(r.output)
    for f in fragments:
        assert f in line, (f, line)
    if setup in ("nproc-mismatch", "local-registry", "no-template"):
        assert not any(q["method"] == "POST" for q in argo_env.requests)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "argo-server.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_is_verified_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    fake = FakeArgo(tls=ctx)
    try:
        fake.workflows[("defectops", "wf1")] = [{"metadata": {"name": "wf1"}, "status": {"phase": "Succeeded"}}]
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ARGO_INSECURE_SKIP_VERIFY",
                  "ARGO_CA_BUNDLE", "ARGO_NAMESPACE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("ARGO_SERVER", fake.url.removeprefix("https://"))  # host:port means https
        monkeypatch.setenv("ARGO_TOKEN", f"Bearer {TOKEN}")
        runner = CliRunner()
        r = runner.invoke(app, ["status", "wf1"])
        assert r.exit_code == EXIT_FAILURE
        line = _one_line_error(r.output)
        assert "TLS verification" in line and "ARGO_CA_BUNDLE" in line
        assert runner.invoke(app, ["status", "wf1", "--insecure"]).exit_code == 0
        monkeypatch.setenv("ARGO_CA_BUNDLE", str(cert))
        r = runner.invoke(app, ["status", "wf1"])
        assert r.exit_code == 0, r.output
        assert all(q["auth"] == f"Bearer {TOKEN}" for q in fake.requests)
        monkeypatch.setenv("ARGO_SERVER", fake.url.replace("https://", "http://"))
        r = runner.invoke(app, ["status", "wf1"])
        assert r.exit_code == EXIT_FAILURE and "cannot reach Argo Server" in _one_line_error(r.output)
    finally:
        fake.close()


def _node(nid: str, name: str, ntype: str, phase: str, *, children: list[str] | None = None, message: str = "",
          exit_code: str | None = None, start: str = "2026-05-04T10:00:00Z", end: str = "") -> dict[str, Any]:
    n: dict[str, Any] = {"id": nid, "name": f"wf.{name}", "displayName": name, "type": ntype, "phase": phase,
                         "templateName": name.split("(")[0], "startedAt": start}
    if end:
        n["finishedAt"] = end
    if children:
        n["children"] = children
    if message:
        n["message"] = message
    if exit_code is not None:
        n["outputs"] = {"exitCode": exit_code}
    return n


def _workflow(phase: str, nodes: list[dict[str, Any]], message: str = "") -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, "progress": "3/7", "startedAt": "2026-05-04T10:00:00Z",
                          "nodes": {n["id"]: n for n in nodes}}
    if message:
        st["message"] = message
    return {"metadata": {"name": "wf1", "namespace": "defectops"}, "status": st}


def test_status_shows_phases_and_exit_codes(argo_env: FakeArgo, argo_schema_if_present: Any) -> None:
    argo_schema = argo_schema_if_present
    ok = [_node("a", "pull-data", "Pod", "Succeeded", start="2026-05-04T10:00:00Z", end="2026-05-04T10:01:05Z"),
          _node("b", "train", "Retry", "Succeeded", children=["b0", "b1"], start="2026-05-04T10:02:00Z",
                end="2026-05-04T10:30:00Z"),
          _node("b0", "train(0)", "Pod", "Error", message="pod deleted", start="2026-05-04T10:02:00Z"),
          _node("b1", "train(1)", "Pod", "Succeeded", exit_code="0", start="2026-05-04T10:10:00Z"),
          _node("c", "pipeline", "DAG", "Succeeded")]
    gate = [*ok[:4], _node("d", "register", "Retry", "Failed", children=["d0"], message=GATE_LOG,
                           start="2026-05-04T10:40:00Z"),
            _node("d0", "register(0)", "Pod", "Failed", exit_code="3", message=GATE_LOG, start="2026-05-04T10:40:00Z")]
    infra = [*ok[:4], _node("e", "export", "Retry", "Error", children=["e0"], message="pod deleted",
                            start="2026-05-04T10:50:00Z"),
             _node("e0", "export(0)", "Pod", "Error", message="pod deleted", start="2026-05-04T10:50:00Z")]
    argo_env.workflows[("defectops", "ok")] = [_workflow("Succeeded", ok)]
    argo_env.workflows[("defectops", "gate")] = [_workflow("Failed", gate, "child 'wf1-123' failed")]
    argo_env.workflows[("defectops", "infra")] = [_workflow("Error", infra)]
    argo_env.workflows[("defectops", "slow")] = [_workflow("Running", ok[:1]), _workflow("Running", ok[:3]),
                                                 _workflow("Succeeded", ok)]
    for answers in argo_env.workflows.values():
        for wf in answers:
            argo_schema(wf["status"], "WorkflowStatus")  # the fake answers what Argo would
    runner = CliRunner()
    r = runner.invoke(app, ["status", "ok"])
    assert r.exit_code == 0, r.output
    assert "Succeeded" in r.output and "pull-data" in r.output and "1m05s" in r.output
    row = next(ln for ln in r.output.splitlines() if "train" in ln)
    assert " 2 " in row  # two attempts: the retry after "pod deleted"
    assert "train(0)" not in r.output
    r = runner.invoke(app, ["status", "gate"])
    assert r.exit_code == EXIT_GATES, r.output
    assert "GATE FAILURE" in r.output and "failed its evaluation gates" in r.output
    r = runner.invoke(app, ["status", "infra"])
    assert r.exit_code == EXIT_FAILURE, r.output
    r = runner.invoke(app, ["status", "slow", "--wait", "--interval", "0.01", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["phase"] == "Succeeded" and [s["name"] for s in out["steps"]] == ["pull-data", "train"]
    assert len([q for q in argo_env.requests if q["path"].endswith("/slow")]) == 3
    r = runner.invoke(app, ["status", "nope"])
    assert r.exit_code == EXIT_FAILURE
    assert "workflow nope not found in namespace defectops" in _one_line_error(r.output)
