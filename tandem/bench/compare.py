"""``tandem bench compare``: side-by-side table of serving benchmark result JSONs.

Reads result files written by ``tandem bench serve`` or by vLLM's ``vllm bench serve`` (same
metric keys) and prints one row per metric, one column per file, and for every file after the
first a ``x vs first`` column holding value / first file's value (blank when either is missing
or the first is zero).

Column headers are each file's ``label`` (``--label`` at benchmark time) or else its file stem.

Sweeps (``{"sweep": [...], "goodput_slos_ms": ..., "max_goodput": ...}``) are supported, but
only against other sweeps (mixing a sweep and a single run is an error): the table then has a
``max_goodput`` row followed by every metric once per request rate (``metric @ 2 req/s``),
matching runs across files by their ``request_rate``.

Per-group metrics (the ``groups`` key, e.g. ``chat`` / ``long`` of the interference dataset)
get extra rows ``metric [group]`` for the selected metrics they carry.

If the files differ in setup (request_rate, num_prompts, max_concurrency, burstiness, model_id,
goodput SLOs) a note under the table says so: the ratios then compare different experiments.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

DEFAULT_METRICS = (
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)

# Setup keys whose differences are reported under the table.
_SETUP_KEYS = ("model_id", "request_rate", "burstiness", "max_concurrency", "num_prompts")

_MISSING = "-"


def add_compare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("results", nargs="+", metavar="RESULT_JSON",
                        help="two or more result JSONs (of `tandem bench serve` or `vllm bench serve`); "
                             "the first is the baseline of the ratio columns. Sweep JSONs can only be "
                             "compared with other sweeps")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated result keys, one row each (default: "
                             + ",".join(DEFAULT_METRICS) + "; those absent from every file are left out)")
    return parser


# --------------------------------------------------------------------------- loading


def is_sweep(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("sweep"), list)


def load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (a benchmark result or a sweep)")
    return data


def _number(value: Any) -> float | int | None:
    """A plottable/comparable number, or None (missing, null, bool, string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rate(value: Any) -> float:
    """request_rate as a float; vLLM writes an infinite rate as the string "inf"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _rate_str(rate: float) -> str:
    return "inf req/s" if math.isinf(rate) else f"{rate:g} req/s"


def _headers(paths: list[Path], datas: list[dict]) -> list[str]:
    names = []
    for path, data in zip(paths, datas):
        label = data.get("label")
        if not label and is_sweep(data) and data["sweep"]:
            label = data["sweep"][0].get("label")
        names.append(str(label) if label else path.stem)
    # Disambiguate repeated headers (same label, or same stem in different folders).
    out = []
    for i, name in enumerate(names):
        out.append(f"{name} #{i + 1}" if names.count(name) > 1 else name)
    return out


# --------------------------------------------------------------------------- rows


def _flat_rows(result: dict, metrics: list[str], suffix: str = "") -> dict[str, Any]:
    """Row key -> raw value for one run: the metrics, then the metrics of each group."""
    rows: dict[str, Any] = {}
    for m in metrics:
        if m in result:
            rows[m + suffix] = result[m]
    groups = result.get("groups")
    if isinstance(groups, dict):
        for gname, gmetrics in groups.items():
            if not isinstance(gmetrics, dict):
                continue
            for m in metrics:
                if m in gmetrics:
                    rows[f"{m} [{gname}]{suffix}"] = gmetrics[m]
    return rows


def _row_order(metrics: list[str], groups: list[str], suffix: str = "") -> list[str]:
    return [m + suffix for m in metrics] + [f"{m} [{g}]{suffix}" for g in groups for m in metrics]


def _group_names(results: list[dict]) -> list[str]:
    names: list[str] = []
    for r in results:
        groups = r.get("groups")
        if isinstance(groups, dict):
            for g in groups:
                if g not in names:
                    names.append(str(g))
    return names


def _available_keys(datas: list[dict]) -> set[str]:
    keys: set[str] = set()
    for data in datas:
        runs = data["sweep"] if is_sweep(data) else [data]
        for run in runs:
            if not isinstance(run, dict):
                continue
            keys.update(run)
            if isinstance(run.get("groups"), dict):
                for g in run["groups"].values():
                    if isinstance(g, dict):
                        keys.update(g)
    return keys


def _table_rows(datas: list[dict], metrics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Ordered row keys and, per file, row key -> raw value."""
    if not is_sweep(datas[0]):
        groups = _group_names(datas)
        per_file = [_flat_rows(d, metrics) for d in datas]
        return _row_order(metrics, groups), per_file

    per_file = [{"max_goodput": d.get("max_goodput")} for d in datas]
    order = ["max_goodput"]
    rates: list[float] = []
    for d in datas:
        for run in d["sweep"]:
            rate = _rate(run.get("request_rate"))
            if not math.isnan(rate) and rate not in rates:
                rates.append(rate)
    rates.sort()
    for rate in rates:
        suffix = f" @ {_rate_str(rate)}"
        runs_at_rate = []
        for d, rows in zip(datas, per_file):
            run = next((r for r in d["sweep"] if _rate(r.get("request_rate")) == rate), None)
            if run is not None:
                rows.update(_flat_rows(run, metrics, suffix))
                runs_at_rate.append(run)
        order += _row_order(metrics, _group_names(runs_at_rate), suffix)
    return order, per_file


# --------------------------------------------------------------------------- formatting


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _MISSING
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return _MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.2f}"
    return str(value)


def format_ratio(ratio: float | None) -> str:
    """Three significant digits, never in exponent form: 2 -> "2.00", 0.5 -> "0.500",
    123.4 -> "123"; from 1000 up, whole numbers (1234.5 -> "1234"). None/NaN/inf -> ""."""
    if ratio is None or math.isnan(ratio) or math.isinf(ratio):
        return ""
    if ratio == 0:
        return "0.00"
    digits = 2 - math.floor(math.log10(abs(ratio)))
    if digits <= 0:
        return f"{ratio:.0f}"
    rounded = round(ratio, digits)
    # Rounding can add a digit (9.996 -> 10.0): recompute so the result keeps 3 figures.
    digits = 2 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{max(digits, 0)}f}"


def _ratio(value: Any, base: Any) -> float | None:
    v, b = _number(value), _number(base)
    if v is None or b is None or b == 0:
        return None
    return v / b


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _setup_notes(headers: list[str], datas: list[dict]) -> list[str]:
    notes = []
    runs = [d["sweep"][0] if is_sweep(d) and d["sweep"] else d for d in datas]
    keys: tuple[str, ...] = _SETUP_KEYS
    if is_sweep(datas[0]):
        keys = tuple(k for k in keys if k != "request_rate")
        slos = [d.get("goodput_slos_ms") for d in datas]
        if any(s != slos[0] for s in slos):
            notes.append("note: goodput_slos_ms differ: "
                         + ", ".join(f"{h}={json.dumps(s)}" for h, s in zip(headers, slos)))
    for key in keys:
        values = [r.get(key) for r in runs]
        if any(v != values[0] for v in values):
            notes.append(f"note: {key} differs: " + ", ".join(f"{h}={v}" for h, v in zip(headers, values)))
    return notes


# --------------------------------------------------------------------------- entry point


def compare_results(paths: list[str | Path], metrics: list[str] | None = None) -> str:
    """The comparison table (and setup notes) as text. Raises ValueError on bad input."""
    files = [Path(p) for p in paths]
    if len(files) < 2:
        raise ValueError("compare needs at least two result JSONs")
    datas = [load_result(p) for p in files]
    sweeps = [is_sweep(d) for d in datas]
    if any(sweeps) and not all(sweeps):
        which = ", ".join(str(p) for p, s in zip(files, sweeps) if s)
        raise ValueError(f"cannot compare a sweep with a single run ({which} is a sweep); "
                         "compare sweeps with sweeps, or single results with single results")

    available = _available_keys(datas)
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in available]
        explicit = False
    else:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ValueError(f"metric(s) not in any file: {', '.join(unknown)}")
        explicit = True

    headers = _headers(files, datas)
    order, per_file = _table_rows(datas, metrics)
    if explicit:
        # Asked-for metrics always get a row; group and per-rate rows only where some file has them.
        order = [k for k in order if k in metrics or any(k in rows for rows in per_file)]
    else:
        # Default metrics: drop rows with no number in any file (e.g. request_goodput without SLOs).
        order = [k for k in order if any(_number(rows.get(k)) is not None for rows in per_file)]

    header = ["metric", headers[0]]
    for h in headers[1:]:
        header += [h, "x vs first"]
    table = []
    for key in order:
        base = per_file[0].get(key)
        row = [key, format_value(base)]
        for rows in per_file[1:]:
            value = rows.get(key)
            row += [format_value(value), format_ratio(_ratio(value, base))]
        table.append(row)

    text = _render(header, table)
    notes = _setup_notes(headers, datas)
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def run_compare(args: argparse.Namespace) -> str:
    metrics = None
    if getattr(args, "metrics", None):
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    text = compare_results(args.results, metrics)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = add_compare_args(argparse.ArgumentParser(prog="tandem bench compare", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        run_compare(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
