"""A client for a DefectOps model served by Triton (HTTP or gRPC): images in, class probabilities and labels out.

Preprocessing is the model's own: image files go through :func:`training.images.preprocess_for_model` (what
``defectops predict images`` and training use) with the input size from the served config and the fit mode from
its ``defectops.fit_mode`` parameter. Class labels come from the config's ``defectops.classes`` parameter (written by
:func:`serving.triton.write_repository`), else from Triton's classification extension over the output's
``label_filename``.

Every failure is a :class:`TritonClientError` with a one-line message naming the URL and the fix; ``usage`` is true
when the fix is in the caller's arguments (an unknown model name, a bad URL or array).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from defectops.serving.triton import PARAM_PREFIX, classes_from_parameters, read_config_parameters

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[str, ...] = ("http", "grpc")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}


class TritonClientError(RuntimeError):
    """A one-line, actionable failure talking to Triton; ``usage`` marks errors fixed by changing the arguments."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class Classification:
    """Per image: ``probabilities`` (N, C) softmax of ``logits``, the ``predicted`` label and its ``confidence``."""

    labels: tuple[str, ...]
    logits: np.ndarray
    probabilities: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return self.probabilities.argmax(1) if len(self.probabilities) else np.zeros(0, np.int64)

    @property
    def predicted(self) -> list[str]:
        return [self.labels[int(k)] for k in self.indices]

    @property
    def confidence(self) -> np.ndarray:
        if not len(self.probabilities):
            return np.zeros(0, np.float32)
        return np.asarray(self.probabilities[np.arange(len(self.probabilities)), self.indices])


@dataclass(frozen=True)
class AnomalyScores:
    """An anomaly model's answer: raw image scores, raw maps (N, 1, H, W), the threshold and the normalisation."""

    scores: np.ndarray
    maps: np.ndarray
    threshold: float
    normalization: dict[str, Any]

    @property
    def defective(self) -> np.ndarray:
        return self.scores >= self.threshold


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def _split_url(url: str, protocol: str) -> tuple[str, bool]:
    """``(host:port, ssl)`` from ``host[:port]`` or ``http(s)://host[:port]`` / ``grpc://host[:port]``."""
    u = url.strip().rstrip("/")
    ssl = u.startswith("https://") or u.startswith("grpcs://")
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if u.startswith(scheme):
            u = u[len(scheme):]
            break
    if not u or "/" in u or "://" in u:
        raise TritonClientError(f"--url {url!r} is not host[:port] (e.g. 127.0.0.1:8000 for HTTP, :8001 for gRPC)",
                                usage=True)
    if ":" not in u.rsplit("]", 1)[-1]:
        u = f"{u}:{DEFAULT_PORTS[protocol]}"
    return u, ssl


class TritonClient:
    """Classify images with a model served by Triton.

    ``url``: ``host:port`` (scheme optional). ``model``: the model name; ``None`` picks the only model the server
    has. ``version``: a version number, ``""`` lets the server's version policy choose. The HTTP client (gevent) is
    bound to the thread that created it: make one :class:`TritonClient` per thread.
    """

    def __init__(self, url: str, model: str | None = None, protocol: str = "http", *, version: str = "",
                 timeout: float = 30.0) -> None:
        if protocol not in PROTOCOLS:
            raise TritonClientError(f"--protocol {protocol!r} is unknown: use http or grpc", usage=True)
        self.protocol = protocol
        self.url = url
        self._addr, ssl = _split_url(url, protocol)
        self.timeout = timeout
        self.version = version
        if protocol == "http":
            import tritonclient.http as tc_http

            self._mod: Any = tc_http
            self._client: Any = tc_http.InferenceServerClient(self._addr, ssl=ssl, connection_timeout=timeout,
                                                              network_timeout=timeout)
        else:
            import tritonclient.grpc as tc_grpc

            self._mod = tc_grpc
            self._client = tc_grpc.InferenceServerClient(self._addr, ssl=ssl)
        self._check_server()
        self.model = model if model else self._only_model()
        self._load_model_info()

    # ------------------------------------------------------------------------------------------------ plumbing
    @property
    def where(self) -> str:
        return f"Triton at {self._addr} ({self.protocol})"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a client call; connection failures become one-line errors naming the URL and the fix."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                kwargs.setdefault("client_timeout", self.timeout)
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            status = str(e.status() or "")
            msg = " ".join(str(e.message() or e).split())
            if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status or "failed to connect" in msg.lower():
                raise self._unreachable(msg) from None
            raise TritonClientError(f"{self.where} failed to {what}: {msg}") from None
        except (OSError, ConnectionError) as e:  # HTTP: refused, reset, DNS, timeouts
            raise self._unreachable(_one_line(e)) from None

    def _unreachable(self, reason: str) -> TritonClientError:
        other = "grpc" if self.protocol == "http" else "http"
        return TritonClientError(
            f"{self.where} is unreachable ({reason}): check --url and that tritonserver is running; its "
            f"{self.protocol.upper()} port is {DEFAULT_PORTS[self.protocol]} by default ({other.upper()} "
            f"{DEFAULT_PORTS[other]}, use --protocol {other} for that one)")

    def _check_server(self) -> None:
        if not self._call("answer", self._client.is_server_live):
            raise TritonClientError(f"{self.where} answers but is not live: check the server log and restart it")

    def _index(self) -> list[dict[str, Any]]:
        if self.protocol == "http":
            return list(self._call("list its models", self._client.get_model_repository_index))
        idx = self._call("list its models", self._client.get_model_repository_index, as_json=True)
        return list(idx.get("models", []))

    def _only_model(self) -> str:
        names = sorted({str(m.get("name")) for m in self._index()})
        if len(names) == 1:
            return names[0]
        if not names:
            raise TritonClientError(f"{self.where} serves no model: publish one with `defectops serve publish` into "
                                    f"its --model-repository")
        raise TritonClientError(f"{self.where} serves several models ({', '.join(names)}): choose one with --model",
                                usage=True)

    def _load_model_info(self) -> None:
        known = {str(m.get("name")): m for m in self._index()}
        if self.model not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise TritonClientError(f"model {self.model!r} is not in the repository of {self.where} (models: "
                                    f"{listed}): pass one of them with --model", usage=True)
        if not self._call("check the model", self._client.is_model_ready, self.model, self.version):
            state = known[self.model]
            reason = next((ln.strip() for ln in str(state.get("reason") or "").splitlines() if ln.strip()), "")
            detail = "; ".join(x for x in (str(state.get("state") or ""), reason[:300]) if x)
            raise TritonClientError(f"model {self.model!r} at {self.where} is not ready ({detail or 'not loaded'}): "
                                    f"check the server log for why it did not load, fix its repository and let "
                                    f"Triton reload it")
        if self.protocol == "http":
            meta = self._call("read the model metadata", self._client.get_model_metadata, self.model, self.version)
            cfg = self._call("read the model config", self._client.get_model_config, self.model, self.version)
        else:
            meta = self._call("read the model metadata", self._client.get_model_metadata, self.model, self.version,
                              as_json=True)
            cfg = self._call("read the model config", self._client.get_model_config, self.model, self.version,
                             as_json=True).get("config", {})
        self.metadata: dict[str, Any] = meta
        self.config: dict[str, Any] = cfg
        inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
        if len(inputs) != 1 or len(outputs) < 1:
            raise TritonClientError(f"model {self.model!r} at {self.where} has {len(inputs)} inputs and "
                                    f"{len(outputs)} outputs: a DefectOps classifier has one image input and one "
                                    f"logits output", usage=True)
        self.input_name = str(inputs[0]["name"])
        self.input_datatype = str(inputs[0]["datatype"])
        self.output_name = str(outputs[0]["name"])
        shape = [int(d) for d in inputs[0]["shape"]]
        self.max_batch_size = int(cfg.get("max_batch_size", 0) or cfg.get("maxBatchSize", 0) or 0)
        self.input_shape: tuple[int, ...] = tuple(shape[1:] if self.max_batch_size > 0 else shape)
        self.parameters = read_config_parameters(_snake_params(cfg))
        self.fit_mode = self.parameters.get(PARAM_PREFIX + "fit_mode", "letterbox")
        self.task = self.parameters.get(PARAM_PREFIX + "task", "")
        self.anomaly: dict[str, Any] = json.loads(self.parameters.get(PARAM_PREFIX + "anomaly", "{}") or "{}")
        if self.task == "anomaly" and not self.anomaly:
            raise TritonClientError(f"model {self.model!r} at {self.where} is an anomaly model without its operating "
                                    f"point (parameter {PARAM_PREFIX}anomaly): republish it with defectops serve "
                                    f"publish", usage=True)
        self.labels: tuple[str, ...] = tuple(classes_from_parameters(self.parameters) or self._labels_from_server())

    def _labels_from_server(self) -> list[str]:
        """Labels through Triton's classification extension (the output's ``label_filename``), one probe request."""
        n = int(self.metadata["outputs"][0]["shape"][-1])
        if n < 1:
            raise TritonClientError(f"model {self.model!r} at {self.where} has no fixed number of classes")
        x = np.zeros((1, *self.input_shape) if self.max_batch_size > 0 else self.input_shape, np.float32)
        inp = self._mod.InferInput(self.input_name, list(x.shape), self.input_datatype)
        inp.set_data_from_numpy(x)
        if self.protocol == "http":
            out = self._mod.InferRequestedOutput(self.output_name, binary_data=False, class_count=n)
        else:
            out = self._mod.InferRequestedOutput(self.output_name, class_count=n)
        res = self._call("classify", self._client.infer, self.model, [inp], model_version=self.version,
                         outputs=[out])
        labels: dict[int, str] = {}
        for item in np.asarray(res.as_numpy(self.output_name)).reshape(-1):
            text = item.decode() if isinstance(item, bytes) else str(item)
            parts = text.split(":", 2)
            if len(parts) != 3:
                raise TritonClientError(f"model {self.model!r} at {self.where} has no labels: add a "
                                        f"label_filename to its output or a defectops.classes parameter")
            labels[int(parts[1])] = parts[2]
        if sorted(labels) != list(range(n)):
            raise TritonClientError(f"model {self.model!r} at {self.where} labels only {len(labels)} of {n} classes: "
                                    f"fix its labels file")
        return [labels[k] for k in range(n)]

    # ------------------------------------------------------------------------------------------------ inference
    @property
    def image_size(self) -> int:
        return int(self.input_shape[-1])

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """The model's input from ``images``.

        float32 ``(N, C, H, W)`` (or one ``(C, H, W)``) in [0, 1] is the model's input already (what
        :func:`training.images.preprocess_for_model` returns); uint8 RGB ``(N, H, W, 3)`` (or one ``(H, W, 3)``) is
        fitted to the model's square with its fit mode and scaled, exactly as preprocess_for_model does for files.
        """
        from defectops.training.images import fit_to_square

        x = np.asarray(images)
        if x.dtype == np.uint8:
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[-1] != 3:
                raise TritonClientError(f"uint8 images must be RGB (N, H, W, 3), got shape {x.shape}", usage=True)
            out = np.empty((len(x), 3, self.image_size, self.image_size), np.float32)
            for k, img in enumerate(x):
                out[k] = fit_to_square(img, self.image_size, self.fit_mode).transpose(2, 0, 1)
            out /= np.float32(255.0)
            x = out
        elif np.issubdtype(x.dtype, np.floating):
            if x.ndim == len(self.input_shape):
                x = x[None]
            x = np.ascontiguousarray(x, np.float32)
        else:
            raise TritonClientError(f"images of dtype {x.dtype} are neither float model inputs nor uint8 RGB",
                                    usage=True)
        if tuple(x.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise TritonClientError(f"model {self.model!r} takes inputs of shape (N, {want}), got {x.shape}",
                                    usage=True)
        return x

    def _infer(self, x: np.ndarray, outputs: Sequence[str]) -> list[list[np.ndarray]]:
        """Run the model on the float input ``x`` in chunks of its ``max_batch_size``: per output, the chunks'
        arrays."""
        step = self.max_batch_size if self.max_batch_size > 0 else len(x)
        outs: list[list[np.ndarray]] = [[] for _ in outputs]
        for i in range(0, len(x), max(step, 1)):
            chunk = x[i:i + step]
            inp = self._mod.InferInput(self.input_name, list(chunk.shape), self.input_datatype)
            if self.protocol == "http":
                inp.set_data_from_numpy(chunk, binary_data=True)
                req = [self._mod.InferRequestedOutput(n, binary_data=True) for n in outputs]
            else:
                inp.set_data_from_numpy(chunk)
                req = [self._mod.InferRequestedOutput(n) for n in outputs]
            res = self._call("run the model", self._client.infer, self.model, [inp], model_version=self.version,
                             outputs=req)
            for k, n in enumerate(outputs):
                outs[k].append(np.asarray(res.as_numpy(n)))
        return outs

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw model outputs for ``images`` (see :meth:`prepare`), in chunks of the model's ``max_batch_size``."""
        (outs,) = self._infer(self.prepare(images), [self.output_name])
        if not outs:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def classify(self, images: np.ndarray) -> Classification:
        """Probabilities (softmax of the logits) and labels for ``images`` (see :meth:`prepare`)."""
        from defectops.training.engine import softmax

        logits = self.logits(images)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise TritonClientError(f"model {self.model!r} at {self.where} returned shape {logits.shape} for "
                                    f"{len(self.labels)} labels: its labels file does not match the model")
        return Classification(self.labels, logits, softmax(logits).astype(np.float32))

    def score_files(self, paths: Sequence[Path]) -> AnomalyScores:
        """An anomaly model's raw image scores and maps for image files, read and resized exactly as
        ``defectops predict images`` does, with the decisions at the model's threshold."""
        from defectops.serving.onnx_export import ANOMALY_OUTPUTS
        from defectops.training.images import resized_image

        if self.task != "anomaly":
            raise TritonClientError(f"model {self.model!r} at {self.where} is not an anomaly model: classify it",
                                    usage=True)
        _, h, w = self.input_shape
        x = np.stack([resized_image(Path(p), int(h), int(w)) for p in paths]).transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, np.float32) / np.float32(255.0)
        scores, maps = self._infer(x, ANOMALY_OUTPUTS)
        return AnomalyScores(np.concatenate(scores).astype(np.float64).reshape(-1),
                             np.concatenate(maps).astype(np.float32, copy=False), float(self.anomaly["threshold"]),
                             dict(self.anomaly["normalization"]))

    def classify_files(self, paths: Sequence[Path]) -> Classification:
        """Read, fit and scale image files exactly as ``defectops predict images`` does, then :meth:`classify`."""
        from defectops.training.images import preprocess_for_model

        return self.classify(preprocess_for_model(list(paths), self.image_size, self.fit_mode))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snake_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """gRPC's JSON may spell ``string_value`` as ``stringValue``: normalise to the HTTP form."""
    params = cfg.get("parameters") or {}
    return {"parameters": {k: {"string_value": v.get("string_value", v.get("stringValue", ""))}
                           if isinstance(v, dict) else v for k, v in params.items()}}
