"""`defectops line serve --mqtt` as a process: what an MES subscribed to the broker receives for boards posted over
HTTP and dropped in a watched folder (results, IPC-CFX UnitsInspected validated against its schema) through a broker
outage and through a SIGKILL of the service while results wait in its spool, a repair station's verdict over MQTT,
and the retained status topic."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import requests
from health import wait_until_ready
from mqtt_broker import Collector, Mosquitto, free_port
from tiny import TinyRun

from defectops.core.layout import RUN
from defectops.serving.line.cfx import MESSAGE_NAME, validate_message
from defectops.serving.line.sinks import topics
from defectops.training.snapshot import load_snapshot

SITE, LINE = "plant1", "smt9"
TOPICS = topics(SITE, LINE)


def _serve(run_root: Path, store: Path, port: int, broker_port: int, watch: Path, log: Path) -> subprocess.Popen[bytes]:
    cli = Path(sys.executable).with_name("defectops")
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(cli), "line", "serve", "--model", str(run_root), "--store", str(store), "--port", str(port),
             "--site", SITE, "--line", LINE, "--mqtt", f"127.0.0.1:{broker_port}", "--watch", str(watch)],
            env={**os.environ, "DEFECTOPS_HOME": str(store.parent / "home")}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    wait_until_ready("defectops line serve", lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200,
                     alive=lambda: proc.poll() is None, log=log, timeout=120)


def n_defects(store: Path, txid: str) -> int:
    results = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    return len(next(r for r in results if r["transaction_id"] == txid)["defects"])


def wait_for_file_line(path: Path, text: str) -> None:
    """Until a line of ``path`` contains ``text`` (a hang guard, not a timing assertion)."""
    def found() -> bool:
        return path.is_file() and any(text in line for line in path.read_text().splitlines())

    wait_until_ready(f"{text} in {path.name}", found, alive=lambda: True, log=None, timeout=60)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_the_mes_receives_results_and_cfx_in_order_through_an_outage(tiny_run: TinyRun, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    results = Collector(broker.port, TOPICS.results, client_id="mes-results", key="transaction_id")
    cfx = Collector(broker.port, TOPICS.cfx(MESSAGE_NAME), client_id="mes-cfx")
    snap = load_snapshot(tiny_run.root / RUN.snapshot)
    boards = [(snap.file(s["path"]), snap.file(s["template"])) for s in snap.samples if s["split"] == "test"]
    store, watch, log, port = tmp_path / "store", tmp_path / "drop", tmp_path / "serve.log", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tiny_run.root, store, port, broker.port, watch, log)
    try:
        _ready(url, proc, log)
        sent: list[str] = []

        def post(i: int) -> None:
            tested, template = boards[i % len(boards)]
            r = requests.post(f"{url}/v1/inspect", data={"unit_id": f"PCB-{i:03d}"}, timeout=60,
                              files={"image": (tested.name, tested.read_bytes()),
                                     "template": (template.name, template.read_bytes())})
            assert r.status_code == 200, r.text
            sent.append(r.json()["transaction_id"])

        for i in range(5):
            post(i)
        broker.terminate()  # the MES broker goes down; the line keeps inspecting
        for i in range(5, 12):
            post(i)
        tested = boards[0][0]
        (watch / "PCB-900.json").write_text(json.dumps({"unit_id": "PCB-900"}))
        shutil.copy2(tested, watch / "PCB-900.jpg.part")
        os.rename(watch / "PCB-900.jpg.part", watch / "PCB-900.jpg")  # a board model without a template: rejected
        broker.start()
        results.wait_for_txids(sent)
        cfx.wait_until(lambda ms: len({json.loads(m.payload)["UniqueID"] for m in ms}) >= len(sent), "every CFX")
        repair = Collector(broker.port, TOPICS.verdicts, client_id="repair-station")
        verdict = {"transaction_id": sent[0], "operator": "ana",
                   "verdicts": [{"defect": i, "verdict": "confirmed"} for i in range(n_defects(store, sent[0]))]}
        repair.client.publish(TOPICS.verdicts, json.dumps(verdict), qos=1).wait_for_publish()
        wait_for_file_line(store / "verdicts.jsonl", sent[0])
        repair.close()
        broker.terminate()  # down again, and this time the line service is killed while results wait in its spool
        for i in range(12, 16):
            post(i)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        broker.start()
        proc = _serve(tiny_run.root, store, port, broker.port, watch, log)
        _ready(url, proc, log)
        results.wait_for_txids(sent)  # the restarted service replays what its spool held
    finally:
        _stop(proc)
    got, seen = [], set()
    for t in results.txids():  # as a receiver de-duplicating on the transaction id sees them
        if t not in seen:
            seen.add(t)
            got.append(t)
    assert got == sent  # every result, in order
    stored = [json.loads(line) for line in (store / "results.jsonl").read_text().splitlines()]
    assert [r["transaction_id"] for r in stored] == sent
    by_id = {json.loads(m.payload)["transaction_id"]: json.loads(m.payload) for m in results.messages}
    assert by_id[sent[0]] == stored[0] and by_id[sent[0]]["model"]["task"] == "aoi"
    for m in cfx.messages:
        message = json.loads(m.payload)
        validate_message(message)
        assert message["MessageName"] == MESSAGE_NAME and message["Source"].endswith(f"{SITE}.{LINE}")
    units = [json.loads(m.payload)["MessageBody"]["InspectedUnits"][0]["UnitIdentifier"] for m in cfx.messages]
    assert set(units) == {f"PCB-{i:03d}" for i in range(16)}
    rejected = list((store / "rejected").glob("*PCB-900.jpg.reason.txt"))
    assert rejected and "template" in rejected[0].read_text()  # the drop-folder board without its template
    status = Collector(broker.port, TOPICS.status)  # a late subscriber reads the retained status: a clean stop
    status.wait_until(lambda ms: bool(ms), "the retained status")
    assert json.loads(status.messages[-1].payload)["status"] == "offline"
    for c in (results, cfx, status):
        c.close()
    broker.terminate()

