"""The triton-serving Helm chart (deploy/helm/triton-serving), offline.

For several value sets: lint strictly (helm_python, Helm v4 SDK), render, parse every document, validate every core
object against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate, at the chart's kubeVersion floor and
at the EKS target), and check the semantics that matter in production: GPU scheduling only in GPU mode, health probes,
IRSA and no AWS keys, the non-root securityContext, the S3 model repository, the HPA metric against the
prometheus-adapter rule, the NetworkPolicy, labels and selectors. kubernetes-validate has no CRD schemas, so the
ServiceMonitor (monitoring.coreos.com/v1) is checked against a small strict JSON schema of the fields this chart uses.
The values schema is exercised too: unknown keys, wrong types and AWS key fields must fail both render and lint.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from repo_paths import REPO

CHART = REPO / "deploy" / "helm" / "triton-serving"
ADAPTER_VALUES = CHART / "prometheus-adapter-values.yaml"
KUBE_VERSIONS = ("1.29.0", "1.31.0")  # Chart.yaml's kubeVersion floor, and the EKS version we run
LINT_KUBE_VERSION = "v1.31.0"
RELEASE, NAMESPACE = "triton", "serving"
FULLNAME = "triton-triton-serving"
ROLE_ARN = "arn:aws:iam::123456789012:role/defectops-triton"
# The Terraform GPU node group: label nvidia.com/gpu.present=true, taint nvidia.com/gpu=true:NoSchedule.
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_access_key_id",
               "aws_secret_access_key", "secretKeyRef")
CRD_KINDS = {"ServiceMonitor"}

# The only values without a usable default.
REQUIRED = {"modelRepository": {"bucket": "defectops-models"}, "serviceAccount": {"roleArn": ROLE_ARN}}

CASES: dict[str, dict[str, Any]] = {
    "gpu-defaults": {},
    "cpu": {"gpu": {"enabled": False}, "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                                     "limits": {"cpu": "2", "memory": "4Gi"}}},
    "hpa-off": {"autoscaling": {"enabled": False}, "replicaCount": 3, "pdb": {"maxUnavailable": "50%"}},
    "netpol-off": {"networkPolicy": {"enabled": False}},
    "custom-s3": {
        "modelRepository": {"bucket": "acme-ml-prod", "prefix": "serving/triton/line-4", "region": "us-east-2"},
        "image": {"tag": "25.06-py3", "digest": "sha256:" + "ab" * 32},
        "triton": {"modelControlMode": "explicit", "loadModels": ["defectops-aoi", "deeppcb"],
                   "extraArgs": ["--model-load-thread-count=2"]},
    },
    "s3-endpoint-root": {"modelRepository": {"bucket": "models", "prefix": "", "endpoint": "https://s3.local:8333"},
                         "triton": {"modelControlMode": "none"}},
    "monitoring-off": {"serviceMonitor": {"enabled": False}, "pdb": {"enabled": False},
                       "topologySpread": {"enabled": False}, "preStopSleepSeconds": 0},
    "existing-sa-and-peers": {
        "serviceAccount": {"create": False, "name": "triton-irsa", "roleArn": ""},
        "autoscaling": {"adapterRuleConfigMap": True},
        "serviceMonitor": {"namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {"ingress": {"namespaces": ["defectops", "line-4"], "podLabels": []},
                          "metrics": {"podLabels": {"app.kubernetes.io/name": "prometheus"}}},
        "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "inference-critical",
        "commonLabels": {"team": "quality"},
        "image": {"pullSecrets": ["ngc"]},
    },
}

# Strict structural schema for the one CRD object (kubernetes-validate has none): the fields this chart renders.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name", "namespace"],
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                             "properties": {"matchLabels": _LABELS}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "scheme": {"enum": ["http", "https"]},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            },
        },
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def case_values(case: str) -> dict[str, Any]:
    return deep_merge(REQUIRED, CASES[case])


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, dict[str, Any]]:
    """Every case rendered once: {case: {"values", "docs", "text", "notes"}}."""
    out = {}
    for case in CASES:
        values = case_values(case)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        notes = "".join(v for k, v in manifests.items() if k.endswith("NOTES.txt"))
        text = "\n---\n".join(v for k, v in sorted(manifests.items()) if not k.endswith("NOTES.txt"))
        docs = [d for d in yaml.safe_load_all(text) if d]
        out[case] = {"values": chart.merge_values(values), "docs": docs, "text": text, "notes": notes}
    return out


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def triton(docs: list[dict]) -> dict:
    (container,) = pod_spec(docs)["containers"]
    return container


def lint_errors(values: dict[str, Any]) -> list[dict]:
    report = helm_python.lint(CHART, values, strict=True, kube_version=LINT_KUBE_VERSION)
    # Info-level findings only may remain, and only the missing icon (no icon we could honestly point at).
    return [m for m in report["messages"] if m["severity"] >= 2 or m["error"] != "icon is recommended"] + [
        {"error": e} for e in report["errors"]]


# --- every value set --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str) -> None:
    assert lint_errors(case_values(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates_strictly(rendered, case: str) -> None:
    docs = rendered[case]["docs"]
    assert docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:  # no CRD schemas in kubernetes-validate: our own strict structural schema
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{case}: {where} invalid for Kubernetes {version} at {list(e.path)}: {e.message}")
        assert doc["metadata"]["namespace"] == NAMESPACE or doc["kind"] in CRD_KINDS


@pytest.mark.parametrize("case", CASES)
def test_gpu_scheduling_only_in_gpu_mode(rendered, case: str) -> None:
    r = rendered[case]
    spec, container = pod_spec(r["docs"]), triton(r["docs"])
    gpu = r["values"]["gpu"]["enabled"]
    limits = container["resources"]["limits"]
    node_selector, tolerations = spec.get("nodeSelector", {}), spec.get("tolerations", [])
    if gpu:
        assert limits["nvidia.com/gpu"] == 1
        assert node_selector.items() >= GPU_NODE_LABEL.items()
        assert GPU_TOLERATION in tolerations
        assert "--allow-gpu-metrics=true" in container["args"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(spec)
        assert "--allow-gpu-metrics=false" in container["args"]
    # Extra scheduling values are kept in both modes.
    assert node_selector.items() >= r["values"]["nodeSelector"].items()
    for t in r["values"]["tolerations"]:
        assert t in tolerations


@pytest.mark.parametrize("case", CASES)
def test_triton_container(rendered, case: str) -> None:
    r = rendered[case]
    values, container, spec = r["values"], triton(r["docs"]), pod_spec(r["docs"])
    repo = values["modelRepository"]
    image = values["image"]
    expected_image = f"{image['repository']}:{image['tag']}" + (f"@{image['digest']}" if image["digest"] else "")
    assert container["image"] == expected_image
    assert container["command"] == ["tritonserver"]
    args = container["args"]
    path = "/".join(p for p in (repo["bucket"], repo["prefix"]) if p)
    uri = f"s3://{repo['endpoint']}/{path}" if repo["endpoint"] else f"s3://{path}"
    assert args[0] == f"--model-repository={uri}"
    assert [a for a in args if a.startswith("--model-repository")] == [args[0]]
    mode = values["triton"]["modelControlMode"]
    assert f"--model-control-mode={mode}" in args
    assert ("--repository-poll-secs=30" in args) == (mode == "poll")
    if mode == "explicit":
        assert [a for a in args if a.startswith("--load-model=")] == [
            f"--load-model={m}" for m in values["triton"]["loadModels"]]
    for flag in ("--strict-readiness=true", "--exit-on-error=true", "--http-port=8000", "--grpc-port=8001",
                 "--metrics-port=8002", "--allow-metrics=true", *values["triton"]["extraArgs"]):
        assert flag in args
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == repo["region"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                             "metrics": 8002}
    # Probes: liveness on live, readiness and startup on ready; the startup probe allows minutes for model loading.
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # Every container has requests and limits.
    for c in spec["containers"] + spec.get("initContainers", []):
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
    assert spec["terminationGracePeriodSeconds"] > values["triton"]["exitTimeoutSecs"] + values["preStopSleepSeconds"]
    assert ("lifecycle" in container) == (values["preStopSleepSeconds"] > 0)
    assert ("topologySpreadConstraints" in spec) == values["topologySpread"]["enabled"]
    strategy = one(r["docs"], "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("case", CASES)
def test_non_root_security_context(rendered, case: str) -> None:
    spec = pod_spec(rendered[case]["docs"])
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 1000
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False  # default: no Kubernetes API token (IRSA needs none)
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    assert not any("hostPath" in v for v in spec["volumes"])


@pytest.mark.parametrize("case", CASES)
def test_irsa_and_no_static_aws_keys(rendered, case: str) -> None:
    r = rendered[case]
    for secret in AWS_SECRETS:
        assert secret not in r["text"] and secret not in r["notes"]
    assert not by_kind(r["docs"], "Secret")
    spec = pod_spec(r["docs"])
    sa_values = r["values"]["serviceAccount"]
    if sa_values["create"]:
        sa = one(r["docs"], "ServiceAccount")
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE_ARN
        assert spec["serviceAccountName"] == sa["metadata"]["name"] == FULLNAME
    else:  # an existing ServiceAccount, annotated outside the chart
        assert not by_kind(r["docs"], "ServiceAccount")
        assert spec["serviceAccountName"] == sa_values["name"]


@pytest.mark.parametrize("case", CASES)
def test_autoscaling_on_adapter_queue_time_metric(rendered, case: str) -> None:
    r = rendered[case]
    values, docs = r["values"], r["docs"]
    deployment = one(docs, "Deployment")
    rule_maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-adapter-rule")]
    if not values["autoscaling"]["enabled"]:
        assert not by_kind(docs, "HorizontalPodAutoscaler") and not rule_maps
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        return
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "20000"}
    # The metric the HPA asks for is the one the shipped prometheus-adapter rule publishes.
    assert metric["pods"]["metric"]["name"] == adapter_file_rule()["name"]["as"] == values["autoscaling"]["metricName"]
    if values["autoscaling"]["adapterRuleConfigMap"]:
        (cm,) = rule_maps
        (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
        assert rule == adapter_file_rule()
    else:
        assert not rule_maps


@pytest.mark.parametrize("case", CASES)
def test_network_policy(rendered, case: str) -> None:
    r = rendered[case]
    np_values = r["values"]["networkPolicy"]
    policies = by_kind(r["docs"], "NetworkPolicy")
    if not np_values["enabled"]:
        assert not policies
        return
    (policy,) = policies
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in spec["ingress"]}
    assert set(rules) == {("http", "grpc"), ("metrics",)}  # 8000/8001 and 8002 only, never all ports
    clients = rules[("http", "grpc")]
    expected = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                for ns in np_values["ingress"]["namespaces"]]
    expected += [{"podSelector": {"matchLabels": labels}} for labels in np_values["ingress"]["podLabels"]]
    assert clients == expected and clients
    (monitoring,) = rules[("metrics",)]
    assert monitoring["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert monitoring.get("podSelector", {}).get("matchLabels", {}) == np_values["metrics"]["podLabels"]
    egress_ports = sorted((p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")]
    https = next(rule for rule in spec["egress"] if rule["ports"] == [{"port": 443, "protocol": "TCP"}])
    assert https["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}]


@pytest.mark.parametrize("case", CASES)
def test_labels_and_selectors(rendered, case: str) -> None:
    r = rendered[case]
    docs, values = r["docs"], r["values"]
    selector = {"app.kubernetes.io/name": "triton-serving", "app.kubernetes.io/instance": RELEASE}
    common = {**selector, "app.kubernetes.io/version": "2.59.0", "app.kubernetes.io/component": "inference-server",
              "app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "triton-serving-0.1.0",
              **values["commonLabels"]}
    expected_kinds = {"Deployment", "Service"}
    expected_kinds |= {"ServiceAccount"} if values["serviceAccount"]["create"] else set()
    expected_kinds |= {"HorizontalPodAutoscaler"} if values["autoscaling"]["enabled"] else set()
    expected_kinds |= {"ConfigMap"} if values["autoscaling"]["enabled"] and values["autoscaling"][
        "adapterRuleConfigMap"] else set()
    expected_kinds |= {"PodDisruptionBudget"} if values["pdb"]["enabled"] else set()
    expected_kinds |= {"ServiceMonitor"} if values["serviceMonitor"]["enabled"] else set()
    expected_kinds |= {"NetworkPolicy"} if values["networkPolicy"]["enabled"] else set()
    assert sorted(d["kind"] for d in docs) == sorted(expected_kinds)
    for doc in docs:
        assert doc["metadata"]["labels"].items() >= common.items(), doc["kind"]
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert pod_labels.items() >= common.items()
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == selector
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for kind, path in (("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
                       ("NetworkPolicy", ("spec", "podSelector", "matchLabels")),
                       ("ServiceMonitor", ("spec", "selector", "matchLabels"))):
        for doc in by_kind(docs, kind):
            got = doc
            for key in path:
                got = got[key]
            assert got == selector, kind
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["metadata"]["namespace"] == (values["serviceMonitor"]["namespace"] or NAMESPACE)
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"  # the Service port carrying Triton's metrics
        assert sm["metadata"]["labels"].items() >= values["serviceMonitor"]["labels"].items()


@pytest.mark.parametrize("case", CASES)
def test_notes(rendered, case: str) -> None:
    r = rendered[case]
    notes, values = r["notes"], r["values"]
    assert triton(r["docs"])["args"][0].removeprefix("--model-repository=") in notes
    assert ("GPU (" in notes) == values["gpu"]["enabled"]
    assert (values["autoscaling"]["metricName"] in notes) == values["autoscaling"]["enabled"]


# --- the prometheus-adapter rule shipped with the chart ---------------------------------------------------------

def adapter_file_rule() -> dict[str, Any]:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def test_adapter_rule_computes_average_queue_time_per_request() -> None:
    doc = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert doc["rules"]["default"] is False
    rule = adapter_file_rule()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = " ".join(rule["metricsQuery"].split())
    numerator, denominator = query.split(" / ", 1)
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])" in numerator
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>}[1m])" in denominator
    assert "by (<<.GroupBy>>)" in numerator and "by (<<.GroupBy>>)" in denominator
    assert denominator.startswith("clamp_min(")  # an idle pod reports 0, not NaN


def test_adapter_rule_follows_metric_name_and_window(chart) -> None:
    values = deep_merge(REQUIRED, {"autoscaling": {"adapterRuleConfigMap": True, "metricName": "queue_us",
                                                   "rateWindow": "2m"}})
    docs = [d for d in yaml.safe_load_all("\n---\n".join(
        v for k, v in chart.render(values, name=RELEASE, namespace=NAMESPACE).items()
        if not k.endswith("NOTES.txt"))) if d]
    (rule,) = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "queue_us"
    assert rule["metricsQuery"].count("[2m]") == 2
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"] == "queue_us"


# --- values schema and documentation ----------------------------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": {"replicaCout": 3},
    "unknown nested key (typo)": {"gpu": {"enable": True}},
    "wrong type": {"replicaCount": "3"},
    "wrong type nested": {"autoscaling": {"enabled": "yes"}},
    "bad enum": {"triton": {"modelControlMode": "auto"}},
    "static AWS key field": {"modelRepository": {"accessKeyId": "AKIAIOSFODNN7EXAMPLE"}},
    "AWS key through env": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"}]},
    "AWS key section": {"aws": {"secretAccessKey": "x"}},
    "role ARN via raw annotation": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": ROLE_ARN}}},
    "malformed role ARN": {"serviceAccount": {"roleArn": "defectops-triton"}},
    "bucket with s3:// scheme": {"modelRepository": {"bucket": "s3://defectops-models"}},
    "prefix with slashes": {"modelRepository": {"prefix": "/triton/"}},
    "repository overridden by extraArgs": {"triton": {"extraArgs": ["--model-repository=/models"]}},
    "non-ClusterIP service": {"service": {"type": "LoadBalancer"}},
    "resources without limits": {"resources": {"limits": None}},
    "bad quantity": {"resources": {"requests": {"cpu": "two"}}},
    "GPU toleration typo": {"gpu": {"tolerations": [{"key": "nvidia.com/gpu", "efect": "NoSchedule"}]}},
}


@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects(chart, bad: dict[str, Any]) -> None:
    values = deep_merge(REQUIRED, bad)
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert lint_errors(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"modelRepository": REQUIRED["modelRepository"]}, "serviceAccount.roleArn is required"),
    ({"serviceAccount": REQUIRED["serviceAccount"]}, "modelRepository.bucket is required"),
    ({**REQUIRED, "serviceAccount": {"create": False}}, "serviceAccount.name is required"),
])
def test_required_values_fail_clearly(chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def _object_schemas(node: Any, path: str = "$"):
    if isinstance(node, dict):
        if "properties" in node:
            yield path, node
        for k, v in node.items():
            yield from _object_schemas(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _object_schemas(v, f"{path}[{i}]")


def test_schema_closed_and_covers_every_value(chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, node in _object_schemas(schema):
        assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
    defs = schema["definitions"]

    def resolve(node: dict) -> dict:
        while "$ref" in node or ("allOf" in node and "properties" not in node):
            node = defs[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node["allOf"][0]
        return node

    def walk(values: dict, node: dict, path: str) -> None:
        node = resolve(node)
        if "properties" not in node:  # a free-form map (labels, annotations, node selectors)
            assert node.get("additionalProperties") == {"type": "string"}, path
            return
        for key, value in values.items():
            assert key in node["properties"], f"{path}{key} is not in values.schema.json"
            sub = resolve(node["properties"][key])
            assert sub.get("description") or node["properties"][key].get("description"), f"{path}{key}"
            if isinstance(value, dict):
                walk(value, sub, f"{path}{key}.")
        for key in node["properties"]:
            assert key in values, f"schema key {path}{key} has no default in values.yaml"

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults == chart.values
    walk(defaults, schema, "")


def test_values_yaml_documents_every_key() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, item_indent = [], None
    for n, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        if item_indent is not None and indent > item_indent:
            continue  # inside a list item: data, not a key
        item_indent = None
        if stripped.startswith("- "):
            item_indent = indent
            continue
        if re.match(r"[A-Za-z][\w./-]*:", stripped):
            prev = next((p for p in reversed(lines[:n]) if p.strip()), "")
            if not prev.lstrip().startswith("#"):
                undocumented.append(stripped.split(":")[0])
    assert undocumented == [], f"values.yaml keys without a comment: {undocumented}"


def test_chart_metadata_and_gpu_pool_defaults(chart) -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["type"] == "application"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    defaults = chart.values
    # NGC container release -> Triton version (Triton's release notes); appVersion must follow the default image.
    triton_release = {"25.06-py3": "2.59.0"}
    assert defaults["image"]["repository"] == "nvcr.io/nvidia/tritonserver"
    assert meta["appVersion"] == triton_release[defaults["image"]["tag"]]
    assert re.fullmatch(r"2[45]\.\d\d-py3", defaults["image"]["tag"])
    # The GPU pool Terraform creates: label nvidia.com/gpu.present=true, taint nvidia.com/gpu=true:NoSchedule.
    assert defaults["gpu"]["enabled"] is True
    assert defaults["gpu"]["nodeSelector"] == GPU_NODE_LABEL
    assert defaults["gpu"]["tolerations"] == [GPU_TOLERATION]
    for template in ("deployment", "service", "serviceaccount", "hpa", "pdb", "servicemonitor", "networkpolicy",
                     "prometheus-adapter-rule"):
        assert (CHART / "templates" / f"{template}.yaml").is_file()
    assert (CHART / "templates" / "NOTES.txt").is_file() and (CHART / "templates" / "_helpers.tpl").is_file()
