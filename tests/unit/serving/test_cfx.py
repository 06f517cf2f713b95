"""IPC-CFX UnitsInspected output: the body's mapping, the envelope, the topic, and the schema that checks them."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from defectops.core.taxonomy import DEFECT_TYPES
from defectops.serving.line import cfx

Result = dict[str, Any]
MakeResult = Callable[..., Result]


@pytest.fixture
def make_result() -> MakeResult:
    """A DefectOps inspection result of the service's shape; keyword arguments override its fields."""

    def make(**overrides: Any) -> Result:
        started = datetime(2025, 3, 4, 5, 6, 7, 123400, tzinfo=UTC)
        result: Result = {
            "transaction_id": str(uuid.uuid4()),
            "unit_id": "PANEL-0042",
            "line_id": "smt3",
            "site": "plant1",
            "position": 1,
            "model": {"name": "aoi_resnet10t_slim", "version": "7", "task": "aoi"},
            "result": "pass",
            "started": started.isoformat(),
            "finished": (started + timedelta(milliseconds=38)).isoformat().replace("+00:00", "Z"),
            "latency_ms": 38.0,
            "image": "s3://line-images/plant1/smt3/PANEL-0042.png",
            "defects": [],
        }
        result.update(overrides)
        return result

    return make


@pytest.fixture
def defects() -> list[dict[str, Any]]:
    """A short on a designated component, an open without one, and a type-agnostic anomaly box."""
    return [
        {"type": "short", "box": [10, 20, 40, 52], "confidence": 0.61, "location": "r2c5", "designator": "U3"},
        {"type": "open", "box": [100.5, 7, 131, 30.25], "confidence": 0.93, "location": "r1c9", "designator": None},
        {"type": "defect", "box": [300, 310, 330, 345], "confidence": 0.42, "location": "r6c6", "designator": None},
    ]


def _message(result: Result, **kw: Any) -> dict[str, Any]:
    return cfx.envelope(cfx.units_inspected(result), source=cfx.cfx_handle(result["site"], result["line_id"]), **kw)


def test_pass_result_builds_a_valid_message(make_result: MakeResult) -> None:
    result = make_result()
    msg = _message(result)
    cfx.validate_message(msg)
    body = msg["MessageBody"]
    assert msg["MessageName"] == "CFX.Production.TestAndInspection.UnitsInspected" and msg["Version"] == "1.7"
    assert msg["Source"] == "defectops.plant1.smt3" and msg["Target"] is None and msg["RequestID"] is None
    assert next(iter(body)) == "$type" and body["$type"] == "CFX.Production.TestAndInspection.UnitsInspected, CFX"
    assert body["TransactionId"] == result["transaction_id"] and body["InspectionMethod"] == "AOI"
    assert body["Inspector"]["OperatorIdentifier"] == "defectops" and body["Inspector"]["ActorType"] == "RemoteSystem"
    assert (body["RecipeName"], body["RecipeRevision"]) == ("aoi_resnet10t_slim", "7")
    (unit,) = body["InspectedUnits"]
    assert unit["UnitIdentifier"] == "PANEL-0042" and unit["UnitPositionNumber"] == 1
    assert unit["OverallResult"] == "Passed" and unit["ActiveRecipeName"] == "aoi_resnet10t_slim"
    (inspection,) = unit["Inspections"]
    assert inspection["Result"] == "Passed" and inspection["DefectsFound"] == []
    assert inspection["InspectionName"] == "DEFECTOPS_AOI" and "aoi_resnet10t_slim 7" in inspection["TestProcedure"]
    assert inspection["InspectionStartTime"] == "2025-03-04T05:06:07.1234+00:00"
    assert inspection["InspectionEndTime"] == "2025-03-04T05:06:07.1614+00:00"
    assert msg["TimeStamp"] == inspection["InspectionEndTime"]  # the event's time, not the sending time
    assert result["image"] in inspection["Comments"]


def test_fail_result_maps_each_defect(make_result: MakeResult, defects: list[dict[str, Any]]) -> None:
    result = make_result(result="fail", position=None, defects=defects)
    msg = _message(result)
    cfx.validate_message(msg)
    (unit,) = msg["MessageBody"]["InspectedUnits"]
    assert unit["OverallResult"] == "Failed" and unit["UnitPositionNumber"] is None
    short, open_, anomaly = unit["Inspections"][0]["DefectsFound"]
    assert unit["Inspections"][0]["Result"] == "Failed"
    assert (short["DefectCode"], open_["DefectCode"], anomaly["DefectCode"]) == ("DO-SHORT", "DO-OPEN", "DO-ANOMALY")
    assert short["ComponentOfInterest"] == {"ReferenceDesignator": "U3", "UnitPosition": None, "PartNumber": None}
    assert open_["ComponentOfInterest"] is None and anomaly["ComponentOfInterest"] is None
    assert short["Description"] == "Short circuit at r2c5 on U3" and open_["Description"] == "Open circuit at r1c9"
    assert anomaly["Description"].startswith("Anomaly")
    assert open_["RegionOfInterest"] == {
        "StartPointX": 100.5, "StartPointY": 7.0,
        "RegionSegments": [{"X": 131.0, "Y": 7.0}, {"X": 131.0, "Y": 30.25}, {"X": 100.5, "Y": 30.25},
                           {"X": 100.5, "Y": 7.0}],
    }
    assert [d["ConfidenceLevel"] for d in (short, open_, anomaly)] == pytest.approx([61.0, 93.0, 42.0])
    assert [d["Priority"] for d in (short, open_, anomaly)] == [2, 1, 3]  # 1 = the most confident
    ids = {d["UniqueIdentifier"] for d in (short, open_, anomaly)} | {unit["Inspections"][0]["UniqueIdentifier"]}
    assert len(ids) == 4
    assert all(d["Verification"] == "NotVerifiedYet" for d in (short, open_, anomaly))


def test_same_result_gives_the_same_message_ids(make_result: MakeResult, defects: list[dict[str, Any]]) -> None:
    result = make_result(result="fail", defects=defects)
    first, again = _message(result), _message(copy.deepcopy(result))
    assert first == again  # a re-sent result is recognisably the same message (UniqueID dedupes)
    other = _message(make_result(result="fail", defects=defects))
    assert other["UniqueID"] != first["UniqueID"]
    explicit = _message(result, unique_id=str(uuid.uuid4()), target="mes.plant1")
    assert explicit["UniqueID"] != first["UniqueID"] and explicit["Target"] == "mes.plant1"
    cfx.validate_message(explicit)


def test_round_trip_through_json(make_result: MakeResult, defects: list[dict[str, Any]]) -> None:
    msg = _message(make_result(result="fail", defects=defects))
    back = json.loads(json.dumps(msg))
    assert back == msg
    cfx.validate_message(back)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = cfx.schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defs = schema["$defs"]
    assert defs["TestResult"]["enum"] == list(cfx.TEST_RESULTS)
    assert defs["InspectionMethod"]["enum"] == list(cfx.INSPECTION_METHODS)
    assert defs["ActorType"]["enum"] == list(cfx.ACTOR_TYPES)
    assert defs["VerificationResult"]["enum"] == list(cfx.VERIFICATION_RESULTS)


@pytest.mark.parametrize(
    ("break_it", "where", "why"),
    [
        (lambda m: m["MessageBody"].pop("TransactionId"), "/MessageBody", "'TransactionId' is a required property"),
        (lambda m: m.pop("UniqueID"), "/", "'UniqueID' is a required property"),
        (lambda m: m["MessageBody"]["InspectedUnits"][0].update(OverallResult="Pass"),
         "/MessageBody/InspectedUnits/0/OverallResult", "'Pass' is not one of"),
        (lambda m: m["MessageBody"].update(InspectionMethod="AI"), "/MessageBody/InspectionMethod", "is not one of"),
        (lambda m: m["MessageBody"]["InspectedUnits"][0]["Inspections"][0]["DefectsFound"][0].update(Site="x"),
         "/MessageBody/InspectedUnits/0/Inspections/0/DefectsFound/0", "Additional properties"),
        (lambda m: m.update(Line="smt3"), "/", "Additional properties"),
        (lambda m: m.update(TimeStamp="2025-03-04T05:06:07"), "/TimeStamp", "does not match"),
        (lambda m: m.update(MessageName=cfx.MESSAGE_NAME.replace("Inspected", "Tested")), "/MessageName",
         "was expected"),
    ],
)
def test_schema_rejects_broken_messages(make_result: MakeResult, defects: list[dict[str, Any]],
                                        break_it: Callable[[dict[str, Any]], object], where: str, why: str) -> None:
    msg = _message(make_result(result="fail", defects=defects))
    break_it(msg)
    with pytest.raises(ValueError, match="invalid at") as info:
        cfx.validate_message(msg)
    assert f"at {where}:" in str(info.value) and why in str(info.value)


def test_invalid_results_are_refused(make_result: MakeResult, defects: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"result\.result must be 'pass' or 'fail'"):
        cfx.units_inspected(make_result(result="ok"))
    with pytest.raises(ValueError, match=r"result\.model\.task"):
        cfx.units_inspected(make_result(model={"name": "m", "version": "1", "task": "segment"}))
    with pytest.raises(ValueError, match=r"result\.transaction_id must be a UUID"):
        cfx.units_inspected(make_result(transaction_id="tx-1"))
    with pytest.raises(ValueError, match=r"result\.started must carry a time zone"):
        cfx.units_inspected(make_result(started="2025-03-04T05:06:07"))
    with pytest.raises(ValueError, match=r"result\.defects\[0\]\.box"):
        cfx.units_inspected(make_result(defects=[{**defects[0], "box": [40, 20, 10, 52]}]))
    with pytest.raises(ValueError, match=r"result\.defects\[0\]\.confidence"):
        cfx.units_inspected(make_result(defects=[{**defects[0], "confidence": 1.5}]))
    with pytest.raises(ValueError, match="InspectionMethod"):
        cfx.units_inspected(make_result(), method="Camera")
    assert cfx.units_inspected(make_result(), method="AXI", inspector="xray-ai")["InspectionMethod"] == "AXI"


def test_defect_codes_are_stable_and_cover_the_taxonomy() -> None:
    assert set(DEFECT_TYPES) | {"defect"} <= set(cfx.DEFECT_CODES)
    codes = [code for code, _ in cfx.DEFECT_CODES.values()]
    assert len(codes) == len(set(codes))
    assert cfx.defect_code("pin-hole") == "DO-PINHOLE"
    assert cfx.defect_code("missing hole") == "DO-X-MISSING_HOLE"  # outside the table: derived from the name
    with pytest.raises(ValueError, match="DefectCode"):
        cfx.defect_code("--")


def test_timestamps_topic_and_handle() -> None:
    assert cfx.cfx_timestamp(datetime(2018, 3, 26, 16, 52, 25, 376953, tzinfo=timezone(timedelta(hours=-4)))) == (
        "2018-03-26T16:52:25.376953-04:00")
    assert cfx.cfx_timestamp(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2025-01-02T03:04:05+00:00"
    with pytest.raises(ValueError, match="time zone"):
        cfx.cfx_timestamp(datetime(2025, 1, 2, 3, 4, 5))  # a naive time
    assert cfx.cfx_topic("plant1", "smt3") == "plant1/smt3/cfx/CFX.Production.TestAndInspection.UnitsInspected"
    assert cfx.cfx_handle("plant1", "smt-3") == "defectops.plant1.smt-3"
    with pytest.raises(ValueError, match="line"):
        cfx.cfx_topic("plant1", "smt/3")
    with pytest.raises(ValueError, match="site"):
        cfx.cfx_handle("plant.1", "smt3")
    with pytest.raises(ValueError, match="source"):
        cfx.envelope({}, source="")
