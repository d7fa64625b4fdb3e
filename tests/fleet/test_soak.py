"""`tandem bench soak`, shortened: the same checks the 30-minute run records, over 40 seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import free_port


@pytest.mark.slow
def test_short_soak_ends_every_request_and_leaks_nothing(model_dirs, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "tandem.cli", "bench", "soak", "--model", str(model_dirs["llama3-gqa"]),
           "--served-model-name", "tiny", "--port", str(free_port()), "--duration-s", "40", "--kill-at-s", "12",
           "--warmup-s", "5", "--window-s", "5", "--sample-every-s", "2", "--concurrency", "4",
           "--output-json", str(out), "--log", str(tmp_path / "fleet.log")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())

    assert report["requests_sent"] > 0
    outcomes = report["outcomes"]  # kind -> outcome -> count
    assert sum(kind.get("ok", 0) for kind in outcomes.values()) > 0, outcomes
    assert not any("accepted_bad_input" in kind for kind in outcomes.values()), outcomes
    assert report["failed_outside_kill_window"] == 0, report["failed_samples"]
    assert report["idle_after_s"] is not None, report["worker_accounts_at_end"]
    assert report["router_in_flight_at_end"] == 0
    for url, account in report["worker_accounts_at_end"].items():
        assert account["accepted"] == account["ended"], (url, account)
        assert account["kv_cache_usage_perc"] == 0, (url, account)
    kill = report["kill"]
    assert not kill["core_still_alive"] and kill["engine_core_exited_after_s"] < 10, kill
    assert {"device", "model", "date", "workload"} <= report.keys()
