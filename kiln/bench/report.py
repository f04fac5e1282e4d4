"""Benchmark reports: the environment, figures per backend, and their JSON / table / markdown forms.

A report is a plain JSON-able dict:
  {"kind", "date", "command", "env": {...}, "model": {...}, "workload": {...}, "settings": {...},
   "roofline": {...}, "results": {"kiln": {...}, "hf": {...}}, "notes": [...]}
Each backend's result holds flat figures (numbers or None) plus a "notes" list.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

# The one figure each kind of report is judged by (a key of every backend's result).
HEADLINE = {"throughput": "output_tok_s", "latency": "decode_tok_s"}

_RESULTS_HEADER = (
    "| date | card | torch / triton / transformers | command | figure | peer (transformers) |\n"
    "|---|---|---|---|---|---|\n"
)


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean / p50 / p90 / p99 of ``values`` times ``scale`` (None when there are no values)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing or broken package is reported as absent
        return None
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version(module)
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def _git_commit() -> str | None:
    """The source tree's commit, "-dirty" when the working tree differs from it (None outside git)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def card_name(device: str | None = None) -> str:
    import torch

    if (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.device(device or "cuda")))
    return "cpu"


def environment(device: str | None = None) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "card": card_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "kiln": _version("kiln"),
        "kiln_commit": _git_commit(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    if env["card"] != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device or "cuda"))
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_count"] = torch.cuda.device_count()
    return env


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``kiln ...`` when run through the kiln entry point or ``-m kiln.cli``."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.basename(argv[0]) in ("kiln", "cli.py", "__main__.py"):
        argv = ["kiln", *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def new_report(
    kind: str, command: str | list[str] | None = None, device: str | None = None
) -> dict[str, Any]:
    """An empty report; ``command`` is the command line (a string, or argv; default sys.argv)."""
    env = environment(device)
    notes = []
    if env["card"] == "cpu":
        notes.append("ran on the CPU: the roofline peaks are a GPU's, so shares of the bound mean nothing")
    return {
        "kind": kind,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if isinstance(command, str) else command_line(command),
        "env": env,
        "model": {},
        "workload": {},
        "settings": {},
        "roofline": {},
        "results": {},
        "notes": notes,
    }


def guarded(backend: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s figures, or, when it raises, a result holding the error: one backend failing
    still leaves the others' figures and the report."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - recorded in the report, traceback on stderr
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {
            "error": f"{type(e).__name__}: {e}",
            "notes": [f"{backend} failed: {type(e).__name__}: {first}"],
        }


def failed_backends(report: dict[str, Any]) -> list[str]:
    return [name for name, res in report["results"].items() if "error" in res]


def write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to a report")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(v)


# Rows of the human-readable table: (label, key in a backend's result). Keys a result lacks show "-".
ROWS = {
    "throughput": [
        ("requests", "num_requests"),
        ("elapsed (s)", "elapsed_s"),
        ("output tok/s", "output_tok_s"),
        ("total tok/s", "total_tok_s"),
        ("requests/s", "requests_per_s"),
        ("TTFT p50 / p90 / p99 (ms)", "ttft_ms"),
        ("per-token p50 / p90 / p99 (ms)", "tpot_ms"),
        ("request latency p50 / p99 (s)", "e2e_s"),
        ("peak batch", "peak_batch"),
        ("peak KV usage", "peak_kv_usage"),
        ("engine step / of it scheduling (ms)", "step_host_ms"),
        ("steps decode-only / mixed (n @ ms)", "step_kinds"),
        ("per step host / device wait / I/O / GC (ms)", "step_split_ms"),
        ("kernels compiled mid-run", "late_kernel_compiles"),
        ("share of roofline", "roofline_share"),
    ],
    "latency": [
        ("batch size", "batch_size"),
        ("iterations (median of)", "iterations"),
        ("decode tok/s per sequence", "decode_tok_s"),
        ("of the iterations min / max", "per_iteration_decode_tok_s"),
        ("decode tok/s, whole batch", "batch_decode_tok_s"),
        ("time per output token (ms)", "tpot_ms"),
        ("TTFT (ms)", "ttft_ms"),
        ("of it queued / prefill steps / the rest (ms)", "ttft_split_ms"),
        ("queued: to the engine / waiting in it (ms)", "queued_split_ms"),
        ("effective bandwidth (GB/s)", "effective_gb_s"),
        ("engine step / of it scheduling (ms)", "step_host_ms"),
        ("per step host / device wait / I/O / GC (ms)", "step_split_ms"),
        ("share of roofline", "roofline_share"),
    ],
}


# figures in ms shown as a / b / c
_SPLITS = ("step_host_ms", "step_split_ms", "ttft_split_ms", "queued_split_ms")


def _cell(key: str, v: Any) -> str:
    if isinstance(v, dict):  # percentiles
        return " / ".join(_fmt(v.get(k)) for k in ("p50", "p90", "p99") if k in v)
    if key in _SPLITS and isinstance(v, (list, tuple)):
        return " / ".join(f"{x:.3f}" for x in v)
    if key == "per_iteration_decode_tok_s" and isinstance(v, (list, tuple)) and v:
        return f"{_fmt(min(v))} / {_fmt(max(v))}"  # the spread behind the median
    if key == "step_kinds" and isinstance(v, (list, tuple)):
        return " / ".join(f"{int(n)} @ {ms:.2f}" for n, ms in v)
    if key in ("roofline_share", "peak_kv_usage") and isinstance(v, float):
        return f"{v:.1%}"
    return _fmt(v)


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary: one column per backend, plus the roofline bound."""
    kind = report["kind"]
    results: dict[str, dict[str, Any]] = report["results"]
    cols = list(results)
    rows = [("", [c for c in cols])]
    for label, key in ROWS[kind]:
        vals = []
        for c in cols:
            v = results[c].get(key)
            if key == "e2e_s" and isinstance(v, dict):
                v = {"p50": v.get("p50"), "p99": v.get("p99")}
            vals.append(_cell(key, v))
        rows.append((label, vals))
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(r[1][i]) for r in rows) for i in range(len(cols))]
    env = report["env"]
    lines = [
        f"== kiln bench {kind}: {report['model'].get('name', '?')} on {env['card']} "
        f"(torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']})",
    ]
    wl = report.get("workload") or {}
    if wl:
        lines.append(
            f"   workload {wl.get('name')}: {wl.get('num_requests')} requests, input "
            f"{wl.get('input_len_min_mean_max')}, output {wl.get('output_len_min_mean_max')} (min/mean/max)"
        )
    for label, vals in rows:
        lines.append(
            f"  {label:<{width0}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(vals, widths, strict=True))
        )
    rf = report.get("roofline") or {}
    if rf.get("bound"):
        lines.append(
            f"  roofline bound ({rf.get('peaks_source')} peaks: {rf['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"{rf['flops_per_s'] / 1e12:.0f} TFLOP/s): {_fmt(rf['bound'])} {rf.get('bound_unit', '')}"
        )
    for c in cols:
        for note in results[c].get("notes", []):
            lines.append(f"  note ({c}): {note}")
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def headline(report: dict[str, Any], backend: str) -> float | None:
    res = report["results"].get(backend)
    return None if res is None else res.get(HEADLINE[report["kind"]])


def markdown_row(report: dict[str, Any]) -> str:
    """One RESULTS.md row: date, card, versions, command, kiln's figure, the transformers peer's."""
    env = report["env"]
    unit = "output tok/s" if report["kind"] == "throughput" else "decode tok/s"
    fig, peer = headline(report, "kiln"), headline(report, "hf")
    results = report["results"]
    share = (report["results"].get("kiln") or {}).get("roofline_share")
    fig_s = "-" if fig is None else f"{fig:,.1f} {unit}" + (f" ({share:.0%} of bound)" if share else "")
    peer_s = "-" if peer is None else f"{peer:,.1f} {unit}"
    if "error" in results.get("kiln", {}):
        fig_s = "failed"
    if "error" in results.get("hf", {}):
        peer_s = "failed"
    hf_note = (report["results"].get("hf") or {}).get("scope")
    if peer is not None and hf_note:
        peer_s += f" ({hf_note})"
    versions = f"{env['torch']} / {env['triton']} / {env['transformers']}"
    cells = [report["date"][:10], env["card"], versions, f"`{report['command']}`", fig_s, peer_s]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n"


def append_results(report: dict[str, Any], path: str) -> None:
    """Append the report's row to a markdown results file (made, with its header, if absent)."""
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        if new:
            f.write("# kiln benchmark results\n\nOne row per `kiln bench ... --append-results` run.\n\n")
            f.write(_RESULTS_HEADER)
        f.write(markdown_row(report))
