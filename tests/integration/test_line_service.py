"""`defectops line serve`: boards inspected over HTTP and from a watched folder with the registry's champion, every
image and result kept, a champion swap in the middle of a stream of requests, the repair station's verdicts."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
from review_support import serve_in_thread
from tiny import TinyRun

from defectops.core.layout import RUN
from defectops.registry.mlflow_registry import client as make_client
from defectops.serving.line.http import create_app
from defectops.serving.line.service import LineConfig, LineService
from defectops.serving.line.store import read_jsonl
from defectops.serving.line.watch import FolderWatcher
from defectops.training.snapshot import load_snapshot


@dataclass
class Line:
    service: LineService
    url: str
    uri: str
    model: str
    boards: list[tuple[Path, Path]]  # (tested, template) of the tiny run's test boards


@pytest.fixture(scope="module")
def line(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    """A copy of the tiny run's registry with version 1 as champion, served from `models:/<name>@champion`."""
    home = tmp_path_factory.mktemp("line-home")
    shutil.copy2(Path(tiny_run.home) / "mlflow.db", home / "mlflow.db")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    model = tiny_run.cfg.registry.model_name
    make_client(uri).set_registered_model_alias(model, "champion", "1")
    snap = load_snapshot(tiny_run.root / RUN.snapshot)
    boards = [(snap.file(s["path"]), snap.file(s["template"])) for s in snap.samples if s["split"] == "test"]
    cfg = LineConfig(model=f"models:/{model}@champion", site="plant1", line_id="smt3", store=home / "store",
                     tracking_uri=uri, cache_dir=home / "cache", templates=home / "templates", poll_s=3600)
    cfg.templates.mkdir()  # type: ignore[union-attr]
    shutil.copy2(boards[0][1], cfg.templates / "design-a.jpg")  # type: ignore[operator]
    service = LineService(cfg)
    assert service.refresh() is True
    with serve_in_thread(create_app(service)) as url:
        yield Line(service, url, uri, model, boards)


def _inspect(url: str, tested: Path, template: Path | None = None, **form: str) -> requests.Response:
    files = {"image": (tested.name, tested.read_bytes())}
    if template is not None:
        files["template"] = (template.name, template.read_bytes())
    return requests.post(f"{url}/v1/inspect", files=files, data={"unit_id": "u1", **form}, timeout=60)


def test_a_board_over_http_is_judged_kept_and_counted(line: Line) -> None:
    tested, template = line.boards[0]
    r = _inspect(line.url, tested, template, unit_id="PCB-0001", position="2")
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["unit_id"] == "PCB-0001" and res["line_id"] == "smt3" and res["site"] == "plant1"
    assert res["model"] == {"name": line.model, "version": "1", "task": "aoi", "good_class": "false_call"}
    assert res["position"] == 2
    assert res["result"] == ("fail" if res["defects"] else "pass")
    for d in res["defects"]:
        assert d["type"] in line.service.current().detector.s.classes and 0 <= d["confidence"] <= 1  # type: ignore[attr-defined]
        assert d["location"].startswith("r") and len(d["box"]) == 4
    kept = line.service.store.root / res["image"]
    assert kept.read_bytes() == tested.read_bytes() and (kept.parent / "template.jpg").is_file()
    stored = {x["transaction_id"]: x for x in read_jsonl(line.service.store.results_path)}
    assert stored[res["transaction_id"]] == res
    by_id = _inspect(line.url, tested, None, template_id="design-a")  # the template by id
    assert by_id.status_code == 200, by_id.text
    metrics = requests.get(f"{line.url}/metrics", timeout=10).text
    assert 'defectops_line_boards_total{line="smt3",result="' in metrics
    assert "defectops_line_inspection_seconds_bucket" in metrics
    assert f'defectops_line_model_version{{model="{line.model}"}}' in metrics
    ready = requests.get(f"{line.url}/readyz", timeout=10).json()
    assert ready["ready"] is True and ready["model"]["version"] in ("1", "2")
    assert requests.get(f"{line.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_bad_input_gets_a_clear_400_and_nothing_is_kept(line: Line, tmp_path: Path) -> None:
    tested, template = line.boards[1]
    before = len(list(read_jsonl(line.service.store.results_path)))
    no_template = _inspect(line.url, tested)
    assert no_template.status_code == 400 and "send the template image or a template id" in no_template.text
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    bad = _inspect(line.url, corrupt, template)
    assert bad.status_code == 400 and bad.json()["detail"]  # names the upload and what is wrong with it
    unknown = _inspect(line.url, tested, None, template_id="nope")
    assert unknown.status_code == 400 and "no template 'nope'" in unknown.text
    escape = _inspect(line.url, tested, None, template_id="../x")
    assert escape.status_code == 400 and "not a plain name" in escape.text
    text = tmp_path / "board.txt"
    text.write_text("hello")
    assert _inspect(line.url, text, template).status_code == 400
    assert len(list(read_jsonl(line.service.store.results_path))) == before


def test_champion_swap_during_a_stream_fails_no_request(line: Line) -> None:
    """Two clients stream boards while version 2 is registered and the champion alias moves to it: every request
    succeeds, each result names the version that produced it, and no client sees version 1 after version 2."""
    c = make_client(line.uri)
    v1 = c.get_model_version(line.model, "1")
    v2 = str(c.create_model_version(line.model, v1.source, run_id=v1.run_id).version)
    for k, v in v1.tags.items():
        c.set_model_version_tag(line.model, v2, k, v)
    versions: dict[int, list[str]] = {0: [], 1: []}
    errors: list[str] = []
    stop = threading.Event()

    def stream(k: int) -> None:
        i = 0
        while not stop.is_set() or i < 6:
            tested, template = line.boards[i % len(line.boards)]
            r = _inspect(line.url, tested, template, unit_id=f"c{k}-{i}")
            if r.status_code != 200:
                errors.append(r.text)
            else:
                versions[k].append(r.json()["model"]["version"])
            i += 1

    threads = [threading.Thread(target=stream, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    c.set_registered_model_alias(line.model, "champion", v2)
    assert line.service.refresh() is True
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors
    for seen in versions.values():
        assert seen and seen[-1] == v2 and "1" in [*versions[0], *versions[1]]
        assert seen == sorted(seen, key=int)  # never back to 1 after 2
    assert line.service.refresh() is False  # the same version: nothing to do
    assert "defectops_line_model_swaps_total 1.0" in requests.get(f"{line.url}/metrics", timeout=10).text


def test_watched_folder_takes_complete_files_only(line: Line, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    watcher = FolderWatcher(line.service, drop, settle_s=0.2)
    seen: dict[Path, tuple[int, int, float]] = {}
    tested, _ = line.boards[2]
    (drop / "PCB-9.json").write_text(json.dumps({"unit_id": "PCB-9", "template_id": "design-a"}))
    shutil.copy2(tested, drop / "PCB-9.jpg.part")  # still being written
    assert watcher.scan_once(seen, 0.0) == 0
    os.rename(drop / "PCB-9.jpg.part", drop / "PCB-9.jpg")  # the camera's rename: complete
    assert watcher.scan_once(seen, 1.0) == 0  # first sight: wait for it to settle
    assert watcher.scan_once(seen, 1.5) == 1
    assert watcher.processed == 1 and not list(drop.iterdir())
    last = list(read_jsonl(line.service.store.results_path))[-1]
    assert last["unit_id"] == "PCB-9" and (line.service.store.root / last["image"]).is_file()
    (drop / "broken.png").write_bytes(b"not an image at all")
    watcher.scan_once(seen, 2.0)
    watcher.scan_once(seen, 3.0)
    rejected = line.service.store.root / "rejected"
    reasons = list(rejected.glob("*broken.png.reason.txt"))
    assert watcher.rejected == 1 and len(reasons) == 1 and reasons[0].read_text().strip()


def test_repair_station_verdicts_are_stored_with_the_result(line: Line) -> None:
    results = list(read_jsonl(line.service.store.results_path))
    failed = next(r for r in results if r["defects"])
    body = {"transaction_id": failed["transaction_id"], "operator": "ana", "station": "repair-1",
            "verdicts": [{"defect": 0, "verdict": "false_fail"}], "missed": [{"box": [1, 2, 30, 40], "type": "short"}]}
    r = requests.post(f"{line.url}/v1/verdicts", json=body, timeout=10)
    assert r.status_code == 201, r.text
    stored = list(read_jsonl(line.service.store.verdicts_path))[-1]
    assert stored["verdicts"] == body["verdicts"] and stored["model"] == failed["model"]
    bad = requests.post(f"{line.url}/v1/verdicts", json={**body, "verdicts": [{"defect": 0, "verdict": "maybe"}]},
                        timeout=10)
    assert bad.status_code == 400 and "confirmed, false_fail, accepted" in bad.text
    missing = requests.post(f"{line.url}/v1/verdicts", json={**body, "transaction_id": "nope"}, timeout=10)
    assert missing.status_code == 404


def test_verified_boards_become_the_next_snapshot(line: Line, tmp_path: Path) -> None:
    """`defectops data import line`: the verified boards (confirmed and missed defects as boxes, false fails left
    out) as a board snapshot read in place, with its lineage; boards not fully verified are left out and counted."""
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app

    verified = {v["transaction_id"] for v in read_jsonl(line.service.store.verdicts_path)}
    results = [r for r in read_jsonl(line.service.store.results_path)
               if len(r["defects"]) >= 2 and r["transaction_id"] not in verified]
    assert len(results) >= 2
    full, partial = results[0], results[1]
    n = len(full["defects"])
    verdicts = [{"defect": i, "verdict": "confirmed" if i == 0 else "false_fail",
                 **({"type": "short"} if i == 0 else {})} for i in range(n)]
    for body in ({"transaction_id": full["transaction_id"], "operator": "ana", "verdicts": verdicts,
                  "missed": [{"box": [5, 6, 25, 26], "type": "open"}]},
                 {"transaction_id": partial["transaction_id"], "operator": "bo",
                  "verdicts": [{"defect": 0, "verdict": "confirmed"}]}):
        assert requests.post(f"{line.url}/v1/verdicts", json=body, timeout=10).status_code == 201
    out = tmp_path / "snap"
    r = CliRunner().invoke(app, ["data", "import", "line", str(line.service.store.root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    snap = load_snapshot(out)
    by_source = {s["source"].rsplit(":", 1)[1]: s for s in snap.samples}
    s = by_source[full["transaction_id"]]
    assert s["boxes"] == [[*full["defects"][0]["box"], "short"], [5, 6, 25, 26, "open"]]
    assert snap.file(s["path"]).read_bytes() == (line.service.store.root / full["image"]).read_bytes()
    assert snap.file(s["template"]).is_file() and s["model"] == f"{line.model}/{full['model']['version']}"
    assert partial["transaction_id"] not in by_source
    lineage = json.loads((out / "snapshot.json").read_text())["lineage"]
    assert lineage["lines"] == ["smt3"] and "ana" in lineage["operators"]
    assert lineage["skipped"]["not every reported defect verified"] >= 1


class _Recurring:
    """A stand-in inspector whose verdicts are scripted: the same solder bridge at one place from unit 30 on, so the
    service's wiring of the alarm monitor can be checked board by board (the monitor itself: test_line_alarm.py)."""

    needs_template = False

    def __init__(self) -> None:
        from defectops.serving.line.results import ModelInfo

        self.info = ModelInfo("scripted", "7", "folder", good_class="good")
        self.n = 0

    def inspect(self, tested: Path, template: Path | None, location: object) -> object:
        from defectops.serving.line.inspector import Verdict
        from defectops.serving.line.results import LineDefect

        self.n += 1
        if self.n < 30:
            return Verdict((), False)
        return Verdict((LineDefect("solder_bridge", (10.0, 10.0, 20.0, 20.0), 0.9, "r0c0", "R12"),), True)


def test_a_recurring_defect_raises_one_alarm_naming_place_type_and_first_unit(line: Line, tmp_path: Path) -> None:
    from defectops.serving.line.service import LineService

    cfg = replace(line.service.cfg, store=tmp_path / "store", model="scripted")
    service = LineService(cfg, resolver=lambda: (_ for _ in ()).throw(AssertionError("not used")))
    service.holder.swap(_Recurring())  # type: ignore[arg-type]
    raised: list[tuple[object, object]] = []
    service.add_alarm_outlet("test", lambda a, r: raised.append((a, r)))
    tested = line.boards[0][0]
    for i in range(45):
        service.inspect(tested, unit_id=f"U{i:03d}")
    assert len(raised) == 1
    alarm, result = raised[0]
    assert alarm.kind == "recurrence" and alarm.location == "R12" and alarm.defect_type == "solder_bridge"  # type: ignore[attr-defined]
    assert alarm.since_unit == "U029" and result.unit_id == "U031"  # type: ignore[attr-defined]
    stored = list(read_jsonl(cfg.store / "alarms.jsonl"))
    assert len(stored) == 1 and stored[0]["location"] == "R12" and stored[0]["model"]["version"] == "7"
    service.stop()  # the monitor's state is kept: a restarted service does not raise the same alarm again
    again = LineService(cfg, resolver=lambda: (_ for _ in ()).throw(AssertionError("not used")))
    again.holder.swap(_Recurring())  # type: ignore[arg-type]
    again.holder.current().n = 45  # type: ignore[union-attr]
    again.add_alarm_outlet("test", lambda a, r: raised.append((a, r)))
    for i in range(45, 55):
        again.inspect(tested, unit_id=f"U{i:03d}")
    assert len(raised) == 1
