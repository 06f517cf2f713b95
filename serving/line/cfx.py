"""IPC-CFX (IPC-2591) output of inspection results: the ``UnitsInspected`` message, its envelope, topic and schema.

What: :func:`units_inspected` builds the body of ``CFX.Production.TestAndInspection.UnitsInspected`` from one
DefectOps inspection result (one image of one unit: transaction id, unit, line, model, pass/fail, defect boxes);
:func:`envelope` wraps it in the CFX envelope (``MessageName``, ``Version``, ``TimeStamp``, ``UniqueID``, ``Source``,
``Target``, ``RequestID``, ``MessageBody``); :func:`cfx_topic` and :func:`cfx_handle` name where and as whom it is
published; :func:`validate_message` checks an enveloped message against ``schemas/cfx_units_inspected.schema.json``
(JSON Schema draft 2020-12, written from the standard's class definitions).

Why: the line's MES, repair stations and dashboards already speak CFX, so an inspection that emits CFX needs no
bespoke adapter per factory; the schema makes "is this what CFX says?" a test instead of a code review.

Sources followed (IPC-CFX SDK, github.com/IPCConnectedFactoryExchange/CFX, read from the stored public index; the
index holds several versions of each file, the commit is the one read):

- ``CFX/Production/TestAndInspection/UnitsInspected.cs`` @ 54f6d2d61d54c8c9f5f0643e17531b41304df0fa (the version
  with ``PrimaryIdentifier``/``HermesIdentifier``; earlier 17e22ddca2dde704620dd15e784d2eff6b65d294 lacks them),
  including its AOI JSON example (``RegionOfInterest`` as a closed outline, ``ConfidenceLevel`` 100.0).
- ``CFX/Structures/``: ``InspectedUnit.cs`` @ 15d0519, ``Inspection.cs`` @ 103c015 (``RefNo`` since 1.3),
  ``Defect.cs`` @ 0478653, ``InspectionMethod.cs`` @ d0cd728 (Human, AOI, SPI, AXI), ``TestResult.cs`` @ c120437
  (``Skipped`` since 1.4), ``Operator.cs`` and ``ActorType.cs`` @ 36cba0d, ``ComponentDesignator.cs`` @ 53523cd
  (with ``UnitPosition``), ``Region.cs`` @ 9a32125, ``Segment.cs`` @ c473c7c, ``SamplingInformation.cs`` @ 9a32125,
  ``SamplingMethod.cs`` @ c473c7c, ``VerificationResult.cs`` @ 73a8b13 (``DefectAccepted`` since 1.5),
  ``Image.cs`` and ``FileTransferMode.cs`` @ 3aaa272.
- ``CFX/CFXEnvelope.cs`` @ 0066eb0 (property set and semantics) and ``CFX/Utilities/JsonConvert.cs`` @ 353933e
  (Newtonsoft.Json, ``TypeNameHandling.Auto`` with simple assembly names, so an enveloped body carries
  ``"$type": "CFX.Production.TestAndInspection.UnitsInspected, CFX"``; enums are ``StringEnumConverter`` names;
  nulls are written). The published SDK reference (connectedfactoryexchange.com, SDK 2.0.0) shows the envelope with
  ``"Version": "1.7"`` and says ``TimeStamp`` "must include the time zone"; messages from SDK-based equipment carry
  ``"TimeStamp": "2024-11-12T12:05:45.6368889+00:00"`` (.NET round-trip form, 7 fractional digits at most).
  No UnitsInspected class documentation page of SDK 2.0 was found, so :data:`CFX_VERSION` is the 1.7 that the
  published envelope example and those messages carry; every field written here exists in 1.7.

Field mapping (DefectOps result -> CFX):

==============================  ====================================================================================
``transaction_id``              ``TransactionId``; also seeds the deterministic ``UniqueIdentifier`` of the inspection
                                and defects and the envelope's default ``UniqueID`` (a re-sent result is a duplicate)
``unit_id``                     ``PrimaryIdentifier`` and ``InspectedUnits[0].UnitIdentifier``
``position``                    ``InspectedUnits[0].UnitPositionNumber`` (``None`` -> null)
``result`` pass/fail            ``OverallResult`` and ``Inspections[0].Result``: ``Passed``/``Failed``
``model.name`` / ``.version``   ``RecipeName``/``RecipeRevision`` (message) and ``ActiveRecipeName``/
                                ``ActiveRecipeRevision`` (unit): the model is the recipe the inspection ran
``model`` (all)                 ``Inspections[0].TestProcedure`` = ``defectops <name> <version> task=<task>``
``model.task``                  ``Inspections[0].InspectionName`` = ``DEFECTOPS_<TASK>``
``started`` / ``finished``      ``InspectionStartTime`` / ``InspectionEndTime`` (CFX time format)
``image``, ``latency_ms``       ``Inspections[0].Comments`` (no CFX field; image is referenced, not embedded)
``defects[i].type``             ``DefectCode`` (:data:`DEFECT_CODES`) and ``Description``
``defects[i].location``         ``Description`` (``"<name> at <location>"``)
``defects[i].designator``       ``ComponentOfInterest.ReferenceDesignator`` (null object when absent)
``defects[i].box``              ``RegionOfInterest``: start ``(x1, y1)``, segments ``(x2,y1) (x2,y2) (x1,y2)
                                (x1,y1)`` -- a closed outline as in the SDK example, in image pixels
``defects[i].confidence``       ``ConfidenceLevel`` = confidence x 100 and ``Priority`` (1 = most confident)
``inspector`` argument          ``Inspector.OperatorIdentifier`` with ``ActorType`` ``RemoteSystem`` (the standard's
                                value for "a remote system or artificial intelligence entity")
``method`` argument             ``InspectionMethod`` (default ``AOI``: automated optical inspection)
(constant)                      ``SamplingInformation.SamplingMethod`` ``NoSampling``; ``Verification``
                                ``NotVerifiedYet`` (model output, not yet confirmed by a person)
==============================  ====================================================================================

``line_id`` and ``site`` are not body fields in CFX: they name the publisher (:func:`cfx_handle`) and the topic
(:func:`cfx_topic`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

CFX_VERSION = "1.7"
MESSAGE_NAME = "CFX.Production.TestAndInspection.UnitsInspected"
BODY_TYPE = f"{MESSAGE_NAME}, CFX"  # the SDK's "$type" (TypeNameAssemblyFormatHandling.Simple)
SCHEMA_FILE = "cfx_units_inspected.schema.json"

# Enumerations as the SDK declares them (CFX/Structures/*.cs), member order kept.
INSPECTION_METHODS: tuple[str, ...] = ("Human", "AOI", "SPI", "AXI")
TEST_RESULTS: tuple[str, ...] = ("Passed", "Failed", "Error", "Aborted", "Skipped")
ACTOR_TYPES: tuple[str, ...] = ("Human", "Robot", "RemoteSystem")
VERIFICATION_RESULTS: tuple[str, ...] = ("NotVerifiedYet", "DefectConfirmed", "DefectRejected", "DefectAccepted")

ANOMALY_TYPE = "defect"  # the type of a type-agnostic anomaly box
TASKS: frozenset[str] = frozenset({"aoi", "folder", "anomaly"})
_RESULTS = {"pass": "Passed", "fail": "Failed"}

# DefectOps defect type -> (DefectCode, human name). Codes are stable: never renumber or reuse one; a new type gets a
# new row. Types outside the table get ``DO-X-<TYPE>`` (see :func:`defect_code`), stable for that type name.
DEFECT_CODES: dict[str, tuple[str, str]] = {
    "open": ("DO-OPEN", "Open circuit"),
    "short": ("DO-SHORT", "Short circuit"),
    "mousebite": ("DO-MOUSEBITE", "Mouse bite"),
    "spur": ("DO-SPUR", "Spur"),
    "copper": ("DO-COPPER", "Spurious copper"),
    "pin-hole": ("DO-PINHOLE", "Pin hole"),
    ANOMALY_TYPE: ("DO-ANOMALY", "Anomaly (type-agnostic)"),
}

# Fixed namespace for the deterministic identifiers (uuid5) derived from a result's transaction id.
_ID_NAMESPACE = uuid.UUID("1fda4217-501d-4a6d-8880-276ec6103db2")
_HANDLE_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def defect_code(defect_type: str) -> str:
    """The CFX ``DefectCode`` of a DefectOps defect type: the table's code, else ``DO-X-<TYPE>`` (upper case, runs of
    characters other than letters and digits as ``_``)."""
    if defect_type in DEFECT_CODES:
        return DEFECT_CODES[defect_type][0]
    slug = re.sub(r"[^A-Z0-9]+", "_", defect_type.upper()).strip("_")
    if not slug:
        raise ValueError(f"defect type {defect_type!r} has no letters or digits to make a DefectCode from")
    return f"DO-X-{slug}"


def cfx_timestamp(when: datetime) -> str:
    """``when`` as the SDK writes a ``DateTime`` (Newtonsoft's ISO form ``yyyy-MM-ddTHH:mm:ss.FFFFFFFK``): fractional
    seconds without trailing zeros, the offset as ``+HH:MM``. CFX requires the time zone: naive times are refused."""
    offset = when.utcoffset()
    if offset is None:
        raise ValueError(f"CFX times must carry a time zone, got the naive datetime {when.isoformat()}")
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += "." + f"{when.microsecond:06d}".rstrip("0")
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def cfx_handle(site: str, line: str) -> str:
    """The CFX handle of the DefectOps endpoint on a line: ``defectops.<site>.<line>`` (dot-separated, as CFX handles
    are; each part letters, digits, ``-`` or ``_``)."""
    _check_parts(site=site, line=line)
    return f"defectops.{site}.{line}"


def cfx_topic(site: str, line: str) -> str:
    """Where a line's UnitsInspected messages are published: ``<site>/<line>/cfx/<MessageName>``."""
    _check_parts(site=site, line=line)
    return f"{site}/{line}/cfx/{MESSAGE_NAME}"


def units_inspected(result: Mapping[str, Any], *, inspector: str = "defectops", method: str = "AOI") -> dict[str, Any]:
    """The ``UnitsInspected`` message body (property order and nulls as the SDK serialises it) of one DefectOps
    inspection result; see the module docstring for the field mapping. Raises ValueError naming the bad field."""
    if method not in INSPECTION_METHODS:
        raise ValueError(f"method must be one of {INSPECTION_METHODS} (CFX InspectionMethod), got {method!r}")
    transaction = _uuid(result, "transaction_id")
    unit_id = _str(result, "unit_id")
    position = result.get("position")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
        raise ValueError(f"result.position must be an int or None, got {position!r}")
    model = result.get("model")
    if not isinstance(model, Mapping):
        raise ValueError("result.model must be a mapping with name, version and task")
    name, version, task = (_str(model, key, "result.model.") for key in ("name", "version", "task"))
    if task not in TASKS:
        raise ValueError(f"result.model.task must be one of {sorted(TASKS)}, got {task!r}")
    verdict = result.get("result")
    if verdict not in _RESULTS:
        raise ValueError(f"result.result must be 'pass' or 'fail', got {verdict!r}")
    started, finished = _time(result, "started"), _time(result, "finished")
    if finished < started:
        raise ValueError("result.finished is before result.started")
    latency = result.get("latency_ms")
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        raise ValueError(f"result.latency_ms must be a number, got {latency!r}")
    image = _str(result, "image")
    raw_defects = result.get("defects")
    if not isinstance(raw_defects, Sequence) or isinstance(raw_defects, str):
        raise ValueError("result.defects must be a list")

    outcome = _RESULTS[verdict]
    defects = [_defect(d, i, transaction) for i, d in enumerate(raw_defects)]
    by_confidence = sorted(range(len(defects)), key=lambda i: (-float(raw_defects[i]["confidence"]), i))
    for rank, i in enumerate(by_confidence, start=1):
        defects[i]["Priority"] = rank
    inspection = {
        "UniqueIdentifier": str(uuid.uuid5(_ID_NAMESPACE, f"{transaction}/inspection")),
        "InspectionName": f"DEFECTOPS_{task.upper()}",
        "InspectionStartTime": cfx_timestamp(started),
        "InspectionEndTime": cfx_timestamp(finished),
        "TestProcedure": f"defectops {name} {version} task={task}",
        "Comments": f"image {image}; latency {float(latency):.1f} ms; RegionOfInterest in image pixels",
        "Result": outcome,
        "Verification": "NotVerifiedYet",
        "VerificationDetail": None,
        "Error": None,
        "DefectsFound": defects,
        "Symptoms": [],
        "Measurements": [],
        "RefNo": None,
    }
    return {
        "PrimaryIdentifier": unit_id,
        "HermesIdentifier": None,
        "TransactionId": transaction,
        "InspectionMethod": method,
        "SamplingInformation": {"SamplingMethod": "NoSampling", "LotSize": None, "SampleSize": None},
        "Inspector": {"OperatorIdentifier": inspector, "ActorType": "RemoteSystem", "LastName": None,
                      "FirstName": None, "LoginName": None},
        "RecipeName": name,
        "RecipeRevision": version,
        "InspectedUnits": [{
            "UnitIdentifier": unit_id,
            "UnitPositionNumber": position,
            "OverallResult": outcome,
            "ActiveRecipeName": name,
            "ActiveRecipeRevision": version,
            "Inspections": [inspection],
            "Verification": "NotVerifiedYet",
        }],
    }


def envelope(body: Mapping[str, Any], *, source: str, target: str | None = None, unique_id: str | None = None,
             timestamp: datetime | None = None) -> dict[str, Any]:
    """The CFX envelope of a UnitsInspected body, as the SDK writes it (the body gets its ``$type`` first).

    ``source`` is the CFX handle of this endpoint (:func:`cfx_handle`). ``TimeStamp`` is when the event happened, not
    when it is sent (the standard's rule): by default the body's latest ``InspectionEndTime``, else now (UTC).
    ``UniqueID`` defaults to an id derived from the body's ``TransactionId`` so that re-sending the same result is
    recognisably the same message (what UniqueID is for), else a random one.
    """
    if not source:
        raise ValueError("source (the CFX handle of this endpoint) is required")
    when = timestamp if timestamp is not None else _event_time(body)
    transaction = body.get("TransactionId")
    if unique_id is None:
        unique_id = (str(uuid.uuid5(_ID_NAMESPACE, f"{transaction}/{MESSAGE_NAME}")) if transaction
                     else str(uuid.uuid4()))
    message_body = {"$type": BODY_TYPE, **{k: v for k, v in body.items() if k != "$type"}}
    return {
        "MessageName": MESSAGE_NAME,
        "Version": CFX_VERSION,
        "TimeStamp": cfx_timestamp(when),
        "UniqueID": unique_id,
        "Source": source,
        "Target": target,
        "RequestID": None,
        "MessageBody": message_body,
    }


@cache
def _schema_text() -> str:
    return resources.files("defectops.serving.line").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an enveloped UnitsInspected message (a fresh copy)."""
    loaded: dict[str, Any] = json.loads(_schema_text())
    return loaded


def validate_message(msg: Mapping[str, Any]) -> None:
    """Check an enveloped UnitsInspected message against the schema; raise ValueError with the failing path (JSON
    pointer style, ``/MessageBody/InspectedUnits/0/OverallResult``) and the reason. Needs ``jsonschema``."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import best_match
    except ImportError as exc:  # a runtime install without the test extra
        raise RuntimeError("validate_message needs the jsonschema package") from exc
    error = best_match(Draft202012Validator(schema()).iter_errors(msg))
    if error is not None:
        path = "/" + "/".join(str(p) for p in error.absolute_path)
        raise ValueError(f"CFX message invalid at {path}: {error.message}")


def _defect(raw: Any, index: int, transaction: str) -> dict[str, Any]:
    where = f"result.defects[{index}]."
    if not isinstance(raw, Mapping):
        raise ValueError(f"result.defects[{index}] must be a mapping")
    kind, location = _str(raw, "type", where), _str(raw, "location", where)
    designator = raw.get("designator")
    if designator is not None and (not isinstance(designator, str) or not designator):
        raise ValueError(f"{where}designator must be a non-empty string or None, got {designator!r}")
    confidence = raw.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.0 <= confidence <= 1.0:
        raise ValueError(f"{where}confidence must be a number in [0, 1], got {confidence!r}")
    box = raw.get("box")
    if (not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in box)):
        raise ValueError(f"{where}box must be [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}box must have x1 <= x2 and y1 <= y2, got {list(box)}")
    human = DEFECT_CODES[kind][1] if kind in DEFECT_CODES else kind
    return {
        "UniqueIdentifier": str(uuid.uuid5(_ID_NAMESPACE, f"{transaction}/defect/{index}")),
        "DefectCode": defect_code(kind),
        "DefectCategory": None,  # the standard's categories are verification-time root causes, not model classes
        "Description": f"{human} at {location}" + (f" on {designator}" if designator else ""),
        "Comments": None,
        "ComponentOfInterest": (None if designator is None
                                else {"ReferenceDesignator": designator, "UnitPosition": None, "PartNumber": None}),
        "RegionOfInterest": {
            "StartPointX": x1,
            "StartPointY": y1,
            "RegionSegments": [{"X": x2, "Y": y1}, {"X": x2, "Y": y2}, {"X": x1, "Y": y2}, {"X": x1, "Y": y1}],
        },
        "DefectImages": [],
        "Priority": None,  # set by units_inspected once all defects are known
        "ConfidenceLevel": round(float(confidence) * 100.0, 4),
        "RelatedMeasurements": [],
        "RelatedSymptoms": [],
        "Verification": "NotVerifiedYet",
        "VerificationDetail": None,
    }


def _event_time(body: Mapping[str, Any]) -> datetime:
    ends = [datetime.fromisoformat(i["InspectionEndTime"])
            for u in body.get("InspectedUnits") or () for i in u.get("Inspections") or ()
            if i.get("InspectionEndTime")]
    return max(ends) if ends else datetime.now(UTC)


def _str(obj: Mapping[str, Any], key: str, where: str = "result.") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}{key} must be a non-empty string, got {value!r}")
    return value


def _uuid(obj: Mapping[str, Any], key: str) -> str:
    value = _str(obj, key)
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise ValueError(f"result.{key} must be a UUID, got {value!r}") from exc


def _time(obj: Mapping[str, Any], key: str) -> datetime:
    value = _str(obj, key)
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"result.{key} must be an ISO-8601 time, got {value!r}") from exc
    if when.utcoffset() is None:
        raise ValueError(f"result.{key} must carry a time zone (UTC), got {value!r}")
    return when


def _check_parts(**parts: str) -> None:
    for name, value in parts.items():
        if not isinstance(value, str) or not _HANDLE_PART.match(value):
            raise ValueError(f"{name} must be letters, digits, '-' or '_' (it names a CFX handle and topic), "
                             f"got {value!r}")
