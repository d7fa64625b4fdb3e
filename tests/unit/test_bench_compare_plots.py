"""`tandem bench compare` tables and the benchmark plots, from hand-made result JSONs."""

from __future__ import annotations

import argparse
import json
import re
import sys

import pytest

from tandem.bench.compare import DEFAULT_METRICS, add_compare_args, compare_results, format_ratio, run_compare
from tandem.bench.plots import plot_goodput_vs_rate, plot_latency_cdfs, plot_token_timeline, request_tpots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(label=None, scale=1.0, *, rate=1.0, tandem_keys=True, goodput=None, groups=None) -> dict:
    """A 4-request result; one failed request (index 3). Latencies are multiplied by `scale`."""
    ttfts = [0.1 * scale, 0.2 * scale, 0.15 * scale, 0.0]
    itls = [[0.02 * scale] * 4, [0.03 * scale] * 2, [0.01 * scale] * 9, []]
    output_lens = [5, 3, 10, 0]
    r = {
        "date": "20261122-233000", "backend": "openai", "endpoint": "/v1/completions", "label": label,
        "model_id": "bench", "num_prompts": 4, "request_rate": rate, "burstiness": 1.0,
        "max_concurrency": None, "duration": 10.0, "completed": 3, "failed": 1,
        "total_input_tokens": 300, "total_output_tokens": 18,
        "request_throughput": 0.3, "request_goodput": goodput, "output_throughput": 1.8 / scale,
        "total_token_throughput": 31.8,
        "mean_ttft_ms": 150.0 * scale, "median_ttft_ms": 150.0 * scale, "std_ttft_ms": 40.0 * scale,
        "p99_ttft_ms": 199.0 * scale,
        "mean_tpot_ms": 20.0 * scale, "median_tpot_ms": 20.0 * scale, "std_tpot_ms": 8.0 * scale,
        "p99_tpot_ms": 29.8 * scale,
        "mean_itl_ms": 15.0 * scale, "median_itl_ms": 10.0 * scale, "std_itl_ms": 7.0 * scale,
        "p99_itl_ms": 30.0 * scale,
        "mean_e2el_ms": 220.0 * scale, "median_e2el_ms": 240.0 * scale, "std_e2el_ms": 20.0 * scale,
        "p99_e2el_ms": 259.0 * scale,
        "input_lens": [100, 100, 100, 100], "output_lens": output_lens, "ttfts": ttfts, "itls": itls,
    }
    if tandem_keys:
        r["e2els"] = [t + sum(g) for t, g in zip(ttfts, itls)]
        r["start_times"] = [0.0, 1.0, 2.5, 3.0]
        r["errors"] = ["", "", "", "boom"]
    if groups:
        r["groups"] = groups
    return r


def _write(tmp_path, name, data) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _parse(table: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and metric -> cells. Cells are split on 2+ spaces, so blanks must be located by
    column position: use the header's column end offsets (values are right-aligned)."""
    lines = table.split("\n\n")[0].splitlines()
    header_line, dash_line = lines[0], lines[1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dash_line)]
    def cells(line):
        return [line[a:b].strip() for a, b in spans]
    rows = {}
    for line in lines[2:]:
        c = cells(line.ljust(len(dash_line)))
        rows[c[0]] = c[1:]
    return cells(header_line.ljust(len(dash_line))), rows


def _num(cell: str) -> float | None:
    return float(cell) if cell not in ("", "-") else None


def test_ratio_format():
    assert format_ratio(2.0) == "2.00"
    assert format_ratio(0.5) == "0.500"
    assert format_ratio(1.23456) == "1.23"
    assert format_ratio(123.4) == "123"
    assert format_ratio(1234.5) == "1234"
    assert format_ratio(9.996) == "10.0"
    assert format_ratio(None) == ""


def test_compare_two_results_ratios(tmp_path, capsys):
    a = _write(tmp_path, "a", _result("base"))
    b = _write(tmp_path, "b", _result(None, scale=2.0))
    parser = add_compare_args(argparse.ArgumentParser())
    text = run_compare(parser.parse_args([a, b]))
    assert capsys.readouterr().out.strip() == text.strip()

    header, rows = _parse(text)
    assert header == ["metric", "base", "b", "x vs first"]
    # request_goodput is null in both files: left out of the default table.
    assert "request_goodput" not in rows
    assert list(rows) == [m for m in DEFAULT_METRICS if m != "request_goodput"]
    assert _num(rows["median_ttft_ms"][0]) == pytest.approx(150.0)
    assert _num(rows["median_ttft_ms"][1]) == pytest.approx(300.0)
    assert _num(rows["median_ttft_ms"][2]) == pytest.approx(2.0)
    assert _num(rows["p99_e2el_ms"][2]) == pytest.approx(2.0)
    assert _num(rows["output_throughput"][2]) == pytest.approx(0.5)
    assert _num(rows["request_throughput"][2]) == pytest.approx(1.0)
    assert rows["median_ttft_ms"][0] == "150.00"  # 2 decimals for ms


def test_compare_missing_metrics_and_vllm_file(tmp_path):
    a = _result("a", goodput=0.2)
    b = _result("b", scale=3.0, tandem_keys=False)  # as written by `vllm bench serve`
    del b["p99_itl_ms"], b["request_goodput"]
    c = _result("c", goodput=0.0)
    paths = [_write(tmp_path, n, d) for n, d in (("a", a), ("b", b), ("c", c))]
    header, rows = _parse(compare_results(paths))
    assert header == ["metric", "a", "b", "x vs first", "c", "x vs first"]
    assert rows["p99_itl_ms"][1:3] == ["-", ""]  # missing value, blank ratio
    assert _num(rows["p99_itl_ms"][4]) == pytest.approx(1.0)
    assert rows["request_goodput"][1:3] == ["-", ""]
    assert _num(rows["request_goodput"][3]) == 0.0 and _num(rows["request_goodput"][4]) == 0.0
    assert _num(rows["median_tpot_ms"][2]) == pytest.approx(3.0)

    # The first value zero: blank ratios.
    c0 = _write(tmp_path, "c0", c)
    _, rows = _parse(compare_results([c0, paths[0]], ["request_goodput", "completed"]))
    assert list(rows) == ["request_goodput", "completed"]
    assert rows["request_goodput"][2] == ""
    assert rows["completed"] == ["3", "3", "1.00"]

    with pytest.raises(ValueError, match="not in any file"):
        compare_results(paths, ["median_ttft_ms", "nope_ms"])
    with pytest.raises(ValueError, match="at least two"):
        compare_results(paths[:1])


def test_compare_groups_and_setup_notes(tmp_path):
    ga = {"chat": {"median_ttft_ms": 50.0, "p99_ttft_ms": 80.0}, "long": {"median_ttft_ms": 400.0}}
    gb = {"chat": {"median_ttft_ms": 25.0, "p99_ttft_ms": 40.0}, "long": {"median_ttft_ms": 800.0}}
    a = _write(tmp_path, "a", _result(groups=ga))
    b = _write(tmp_path, "b", _result(groups=gb, rate=2.0))
    text = compare_results([a, b])
    _, rows = _parse(text)
    assert _num(rows["median_ttft_ms [chat]"][2]) == pytest.approx(0.5)
    assert _num(rows["median_ttft_ms [long]"][2]) == pytest.approx(2.0)
    assert "p99_ttft_ms [long]" not in rows
    assert "note: request_rate differs: a=1.0, b=2.0" in text


def test_compare_sweeps(tmp_path):
    slos = {"ttft": 500, "tpot": 100}
    sa = {"sweep": [_result("A", rate=1.0, goodput=0.9), _result("A", rate=2.0, goodput=1.5)],
          "goodput_slos_ms": slos, "max_goodput": 2.0}
    sb = {"sweep": [_result("B", 2.0, rate=1.0, goodput=0.9), _result("B", 2.0, rate=4.0, goodput=1.0)],
          "goodput_slos_ms": slos, "max_goodput": 4.0}
    a, b = _write(tmp_path, "sa", sa), _write(tmp_path, "sb", sb)
    text = compare_results([a, b])
    header, rows = _parse(text)
    assert header == ["metric", "A", "B", "x vs first"]
    assert _num(rows["max_goodput"][2]) == pytest.approx(2.0)
    assert _num(rows["median_ttft_ms @ 1 req/s"][2]) == pytest.approx(2.0)
    assert rows["median_ttft_ms @ 2 req/s"][1:] == ["-", ""]
    assert rows["median_ttft_ms @ 4 req/s"][0] == "-"
    assert _num(rows["request_goodput @ 2 req/s"][0]) == pytest.approx(1.5)
    assert "note" not in text

    single = _write(tmp_path, "single", _result("x"))
    with pytest.raises(ValueError, match="sweep"):
        compare_results([a, single])


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_request_tpots_with_and_without_e2els():
    full = sorted(request_tpots(_result()))
    bare = sorted(request_tpots(_result(tandem_keys=False)))
    # (e2el - ttft) / (n - 1): 0.08/4, 0.06/2, 0.09/9; the failed request is dropped in both.
    assert full == pytest.approx(sorted([0.02, 0.03, 0.01]))
    assert bare == pytest.approx(full)


def test_plots_write_pngs(tmp_path):
    out = tmp_path / "plots" / "nested"
    p = plot_latency_cdfs({"tandem": _result(), "vllm": _result(scale=1.5, tandem_keys=False)}, out)
    assert p == out / "latency_cdf.png"
    _assert_png(p)

    p = plot_token_timeline(_result(), out)
    assert p.name == "token_timeline.png"
    _assert_png(p)
    p = plot_token_timeline(_result(tandem_keys=False), tmp_path / "bare")
    _assert_png(p)

    sweep = {"sweep": [_result(rate=r, goodput=g) for r, g in ((1.0, 0.3), (2.0, 0.5), ("inf", 0.1))],
             "goodput_slos_ms": {"ttft": 500, "tpot": 100}, "max_goodput": 2.0}
    p = plot_goodput_vs_rate(sweep, out)
    assert p.name == "goodput_vs_rate.png"
    _assert_png(p)
    # No SLOs: no goodput, no max_goodput.
    bare_sweep = {"sweep": [_result(rate=1.0), _result(rate=2.0)], "goodput_slos_ms": {}, "max_goodput": None}
    _assert_png(plot_goodput_vs_rate(bare_sweep, tmp_path / "bare"))
    # A sweep in the CDF plot becomes one curve per rate.
    _assert_png(plot_latency_cdfs({"sweep": sweep}, tmp_path / "cdf_sweep"))

    with pytest.raises(ValueError):
        plot_token_timeline(sweep, out)


def test_empty_result_still_plots(tmp_path):
    empty = {"ttfts": [], "itls": [], "output_lens": []}
    _assert_png(plot_latency_cdfs({"empty": empty}, tmp_path))
    _assert_png(plot_token_timeline(empty, tmp_path))


def test_plots_module_import_is_cheap():
    import importlib
    import subprocess
    code = ("import sys, tandem.bench.plots, tandem.bench.compare; "
            "sys.exit(1 if 'matplotlib' in sys.modules else 0)")
    assert importlib.util.find_spec("tandem.bench.plots") is not None
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
