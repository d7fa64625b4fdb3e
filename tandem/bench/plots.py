"""Plots of serving benchmark results (``tandem bench serve`` / ``vllm bench serve`` JSONs).

matplotlib is imported inside the functions (Agg canvas, no pyplot state), so importing this
module costs nothing. Each function creates ``out_dir`` and returns the PNG path it wrote.

Per-request series are read from the result's lists: ``ttfts``, ``itls``, ``output_lens`` and,
when present (tandem writes them, vLLM does not), ``e2els``, ``start_times`` and ``errors``.
A request is left out when its ``errors`` entry is non-empty or its output length is 0 (vLLM
records failed requests with output length 0 and TTFT 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LATENCY_CDF_PNG = "latency_cdf.png"
TOKEN_TIMELINE_PNG = "token_timeline.png"
GOODPUT_VS_RATE_PNG = "goodput_vs_rate.png"


# --------------------------------------------------------------------------- per-request data


def _list(result: dict, key: str) -> list | None:
    value = result.get(key)
    return value if isinstance(value, list) else None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return None if math.isnan(x) else x


def request_rows(result: dict) -> list[dict]:
    """Successful requests as dicts: ttft, itls, e2el (seconds), output_len, start (seconds or None)."""
    ttfts = _list(result, "ttfts") or []
    itls = _list(result, "itls")
    e2els = _list(result, "e2els")
    out_lens = _list(result, "output_lens")
    starts = _list(result, "start_times")
    errors = _list(result, "errors")

    rows = []
    for i, ttft in enumerate(ttfts):
        ttft = _num(ttft)
        if ttft is None:
            continue
        if errors is not None and i < len(errors) and errors[i]:
            continue
        out_len = _num(out_lens[i]) if out_lens is not None and i < len(out_lens) else None
        if out_len is not None and out_len <= 0:
            continue
        gaps = itls[i] if itls is not None and i < len(itls) and isinstance(itls[i], list) else []
        gaps = [g for g in (_num(x) for x in gaps) if g is not None]
        e2el = _num(e2els[i]) if e2els is not None and i < len(e2els) else None
        if e2el is None:
            e2el = ttft + sum(gaps)
        start = _num(starts[i]) if starts is not None and i < len(starts) else None
        rows.append({"ttft": ttft, "itls": gaps, "e2el": e2el,
                     "output_len": None if out_len is None else int(out_len), "start": start})
    return rows


def request_tpots(result: dict) -> list[float]:
    """Per-request TPOT in seconds, (e2el - ttft) / (output_len - 1), for output_len > 1.

    Without ``output_lens`` the number of streamed chunks (1 + len(itls)) stands in for it."""
    tpots = []
    for r in request_rows(result):
        n = r["output_len"] if r["output_len"] is not None else 1 + len(r["itls"])
        if n > 1:
            tpots.append((r["e2el"] - r["ttft"]) / (n - 1))
    return tpots


def _expand_sweeps(results: dict[str, dict]) -> dict[str, dict]:
    """A sweep value becomes one entry per rate, labelled "label @ R req/s"."""
    out: dict[str, dict] = {}
    for label, result in results.items():
        if isinstance(result.get("sweep"), list):
            for run in result["sweep"]:
                rate = run.get("request_rate")
                out[f"{label} @ {rate:g} req/s" if isinstance(rate, (int, float)) else f"{label} @ {rate}"] = run
        else:
            out[label] = result
    return out


def _save(fig, out_dir: str | Path, name: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


# --------------------------------------------------------------------------- plots


def plot_latency_cdfs(results: dict[str, dict], out_dir: str | Path) -> Path:
    """CDFs of TTFT and of per-request TPOT (ms) for each labelled result; writes latency_cdf.png.

    A sweep given as a value is drawn as one curve per request rate."""
    import numpy as np
    from matplotlib.figure import Figure

    runs = _expand_sweeps(results)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_ttft, ax_tpot = fig.subplots(1, 2)
    drawn = {"TTFT": False, "TPOT": False}
    for label, result in runs.items():
        series = {"TTFT": [r["ttft"] for r in request_rows(result)], "TPOT": request_tpots(result)}
        for (name, values), ax in zip(series.items(), (ax_ttft, ax_tpot)):
            if not values:
                continue
            ms = np.sort(np.asarray(values, dtype=np.float64) * 1000.0)
            y = np.arange(1, len(ms) + 1) / len(ms)
            ax.step(ms, y, where="post", label=f"{label} (n={len(ms)})")
            drawn[name] = True
    for name, ax in (("TTFT", ax_ttft), ("TPOT", ax_tpot)):
        ax.set_title(f"{name} CDF" + (" (per request)" if name == "TPOT" else ""))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if drawn[name]:
            ax.legend(fontsize="small", loc="lower right")
        else:
            _no_data(ax, f"{name} data")
    return _save(fig, out_dir, LATENCY_CDF_PNG)


def plot_token_timeline(result: dict, out_dir: str | Path) -> Path:
    """Cumulative output tokens vs wall time, one thin line per request; writes token_timeline.png.

    Chunk k of a request arrives at start_time + ttft + sum(itls[:k]) (start 0 for every request
    when ``start_times`` is missing). If a request's output length differs from its chunk count
    (chunks carrying several tokens), its tokens are spread evenly over its chunks."""
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    if isinstance(result.get("sweep"), list):
        raise ValueError("plot_token_timeline takes one run; pass an element of sweep['sweep']")
    rows = request_rows(result)
    have_starts = any(r["start"] is not None for r in rows)
    segments, firsts = [], []
    for r in rows:
        t0 = (r["start"] or 0.0) + r["ttft"]
        times = t0 + np.concatenate(([0.0], np.cumsum(r["itls"])))
        n_chunks = len(times)
        n_tokens = r["output_len"] or n_chunks
        tokens = np.arange(1, n_chunks + 1) * (n_tokens / n_chunks)
        if r["start"] is not None:  # show the wait for the first token as a flat start at 0
            times = np.concatenate(([r["start"]], times))
            tokens = np.concatenate(([0.0], tokens))
        segments.append(np.column_stack([times, tokens]))
        firsts.append((t0, tokens[1] if r["start"] is not None else tokens[0]))

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    if segments:
        lw = 0.8 if len(segments) <= 200 else 0.4
        ax.add_collection(LineCollection(segments, linewidths=lw, alpha=0.6, colors="tab:blue"))
        fx, fy = zip(*firsts)
        ax.scatter(fx, fy, s=4, color="tab:red", zorder=3, label="first token")
        ax.autoscale()
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", loc="upper left")
    else:
        _no_data(ax, "successful requests")
    ax.set_xlabel("time since benchmark start (s)" if have_starts else "time since request sent (s)")
    ax.set_ylabel("cumulative output tokens")
    title = f"Token timeline ({len(rows)} requests"
    rate = result.get("request_rate")
    if rate is not None:
        title += f", request rate {rate}"
    ax.set_title(title + ")")
    ax.grid(True, alpha=0.3)
    return _save(fig, out_dir, TOKEN_TIMELINE_PNG)


def plot_goodput_vs_rate(sweep: dict, out_dir: str | Path) -> Path:
    """request_goodput and request_throughput vs request_rate for a sweep, max_goodput marked;
    writes goodput_vs_rate.png. Runs with an infinite or missing rate are left out."""
    from matplotlib.figure import Figure

    runs = sweep.get("sweep")
    if not isinstance(runs, list):
        raise ValueError("plot_goodput_vs_rate takes a sweep JSON ({'sweep': [...], ...})")
    points = []
    for run in runs:
        try:
            rate = float(run.get("request_rate"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(rate):
            points.append((rate, _num(run.get("request_throughput")), _num(run.get("request_goodput"))))
    points.sort()

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    if points:
        rates = [p[0] for p in points]
        ax.plot(rates, rates, ls=":", color="gray", lw=1, label="offered rate")
        tput = [(p[0], p[1]) for p in points if p[1] is not None]
        if tput:
            ax.plot(*zip(*tput), marker="o", label="request throughput")
        good = [(p[0], p[2]) for p in points if p[2] is not None]
        if good:
            ax.plot(*zip(*good), marker="s", label="request goodput")
    else:
        _no_data(ax, "runs with a finite request rate")
    best = _num(sweep.get("max_goodput"))
    if best is not None:
        ax.axvline(best, color="tab:red", ls="--", lw=1.2, label=f"max goodput = {best:g} req/s")
    slos = sweep.get("goodput_slos_ms")
    title = "Goodput vs request rate"
    if isinstance(slos, dict) and slos:
        title += " (SLOs: " + ", ".join(f"{k} ≤ {v:g} ms" if isinstance(v, (int, float)) else f"{k} {v}"
                                        for k, v in slos.items()) + ")"
    ax.set_title(title)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if points or best is not None:
        ax.legend(fontsize="small", loc="upper left")
    return _save(fig, out_dir, GOODPUT_VS_RATE_PNG)
