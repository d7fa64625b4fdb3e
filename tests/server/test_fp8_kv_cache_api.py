"""`tandem serve --kv-cache-dtype fp8`: it serves, says so in vllm:cache_config_info, and a bad FP8
flag stops the server at start-up with the parameter named."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.helpers import start_server, stop_server


def test_fp8_server_serves_and_reports_its_cache_dtype(model_dirs):
    proc, base = start_server(model_dirs["llama3-gqa"], "--kv-cache-dtype", "fp8", "--calculate-kv-scales")
    try:
        body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info{"))
        assert 'cache_dtype="fp8"' in info and 'calculate_kv_scales="True"' in info
    finally:
        stop_server(proc)


def test_a_bad_fp8_flag_stops_the_server_at_start_up(model_dirs):
    cmd = [sys.executable, "-m", "tandem.cli", "serve", str(model_dirs["llama3-gqa"]), "--kv-cache-memory", "8MiB",
           "--kv-cache-dtype", "fp8", "--kv-cache-dtype-skip-layers", "0,99"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "kv_cache_dtype_skip_layers: layer 99 out of range" in proc.stdout + proc.stderr
