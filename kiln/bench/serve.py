"""`kiln bench serve`: Poisson arrivals against any OpenAI-compatible server, streaming.

Each request is a completion whose prompt is ``isl`` random token ids and which must produce ``osl``
tokens (``ignore_eos``), so the work is fixed by the workload alone. Per request we time the first
token (TTFT), the gaps between streamed tokens (ITL), the mean time per output token after the first
(TPOT) and the whole request (E2E). ``--rate`` takes several values: a sweep, one report entry per rate,
and ``--plot`` draws latency against output throughput over it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.bench.report import percentiles, write_json
from kiln.bench.workloads import Workload, synthetic


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id to send (default: the server's first model)")
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="request rate(s) in requests/s (Poisson arrivals); several make a sweep; inf = all at once",
    )
    parser.add_argument("--num-requests", type=int, default=200, help="requests per rate (default 200)")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--osl", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn below this")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of prompts and arrival times; each rate of a sweep draws fresh prompts (seed + index), "
        "so no rate reuses an earlier rate's prefixes from the server's cache",
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=2,
        help="requests sent one at a time before the first rate and left out of the figures (default 2)",
    )
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (for servers that reject it; outputs may then be shorter than --osl)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="latency against throughput over the rates: FILE.svg (no dependencies) or FILE.png (matplotlib)",
    )
    return parser


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    """Send one streaming completion and time its chunks (a chunk may carry several tokens)."""
    res = RequestResult(ok=False, prompt_tokens=len(body["prompt"]))
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"].get("message"))
                    return res
                if msg.get("usage"):
                    res.output_tokens = int(msg["usage"].get("completion_tokens", res.output_tokens))
                    details = msg["usage"].get("prompt_tokens_details") or {}
                    res.cached_tokens = int(details.get("cached_tokens") or 0)
                if not msg.get("choices"):
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except Exception as e:  # noqa: BLE001 - counted as a failed request, the run goes on
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = last - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = res.ttft is not None
    return res


async def run_rate(
    args: argparse.Namespace, model: str, wl: Workload, rate: float, concurrency: int | None = None
) -> dict[str, Any]:
    import httpx

    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    concurrency = concurrency or args.concurrency
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    limits = httpx.Limits(max_connections=concurrency or None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def send(i: int) -> RequestResult:
            body: dict[str, Any] = {
                "model": model,
                "prompt": wl.prompts[i],
                "max_tokens": wl.output_lens[i],
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if not args.no_ignore_eos:
                body["ignore_eos"] = True
            if sem is None:
                return await _one(client, url, body, headers)
            async with sem:
                return await _one(client, url, body, headers)

        tasks = []
        t0 = time.perf_counter()
        for i in range(wl.num_requests):
            tasks.append(asyncio.create_task(send(i)))
            if math.isfinite(rate) and i + 1 < wl.num_requests:
                await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return summarize(results, elapsed, rate)


def summarize(results: list[RequestResult], elapsed: float, rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def stats(values: list[float]) -> dict[str, float | None]:
        p = percentiles(values, scale=1000.0)  # milliseconds
        return {"mean": p["mean"], "median": p["p50"], "p99": p["p99"]}

    errors = sorted({r.error for r in results if r.error})
    return {
        "rate": rate if math.isfinite(rate) else "inf",
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
        "output_tok_s": out_tokens / elapsed if elapsed > 0 else None,
        "total_tok_s": (in_tokens + out_tokens) / elapsed if elapsed > 0 else None,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "ttft_ms": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": stats([x for r in ok for x in r.itl]),
        "e2e_ms": stats([r.e2e for r in ok if r.e2e is not None]),
        "errors": errors[:5],
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"== kiln bench serve: {report['model']} at {report['base_url']}",
        f"   {report['workload']['num_requests']} requests per rate, isl {report['workload']['isl']}, "
        f"osl {report['workload']['osl']}, concurrency {report['settings']['concurrency'] or 'unlimited'}, "
        f"{report['workload']['warmup_requests']} warm-up requests before the first rate",
    ]
    for r in report["results"]:
        lines.append(
            f"-- rate {r['rate']} req/s: {r['completed']}/{r['num_requests']} ok in {r['elapsed_s']:.2f}s, "
            f"{_fmt(r['output_tok_s'])} output tok/s, {_fmt(r['requests_per_s'])} req/s, "
            f"{r['cached_prompt_tokens']} of {r['prompt_tokens']} prompt tokens from the prefix cache"
        )
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = r[name]
            lines.append(
                f"   {name[:-3].upper():<5} mean {_fmt(s['mean']):>9}  median {_fmt(s['median']):>9}  "
                f"p99 {_fmt(s['p99']):>9}  ms"
            )
        for e in r["errors"]:
            lines.append(f"   error: {e}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plotting

_SERIES = (
    ("ttft_ms", "median", "TTFT median"),
    ("ttft_ms", "p99", "TTFT p99"),
    ("tpot_ms", "mean", "TPOT mean"),
    ("e2e_ms", "median", "E2E median"),
)
_COLORS = ("#1f77b4", "#aec7e8", "#d62728", "#2ca02c")


def _points(results: list[dict[str, Any]], metric: str, stat: str) -> list[tuple[float, float]]:
    pts = [(r["output_tok_s"], r[metric][stat]) for r in results]
    return sorted((x, y) for x, y in pts if x is not None and y is not None)


def write_plot(report: dict[str, Any], path: str) -> None:
    results = report["results"]
    title = f"{report['model']}: isl {report['workload']['isl']}, osl {report['workload']['osl']}"
    if path.lower().endswith(".svg"):
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg_plot(results, title))
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            f"--plot {path}: a PNG needs matplotlib (pip install matplotlib); "
            "or name the file .svg, which needs nothing"
        ) from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (metric, stat, label), color in zip(_SERIES, _COLORS, strict=True):
        pts = _points(results, metric, stat)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def svg_plot(results: list[dict[str, Any]], title: str) -> str:
    """Latency (log scale, ms) against output throughput as a standalone SVG."""
    w, h, left, right, top, bottom = 720, 450, 70, 160, 40, 50
    series = [
        (label, color, _points(results, m, s)) for (m, s, label), color in zip(_SERIES, _COLORS, strict=True)
    ]
    xs = [x for _, _, pts in series for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, _, pts in series for _, y in pts if y > 0] or [1.0, 10.0]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    ly1 = ly1 if ly1 > ly0 else ly0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (math.log10(max(y, 10.0**ly0)) - ly0) / (ly1 - ly0) * (h - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
        f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{_esc(title)}</text>',
    ]
    for e in range(ly0, ly1 + 1):
        y = py(10.0**e)
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{10.0**e:g}</text>'
        )
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 18}" text-anchor="middle">{x:,.0f}</text>')
    out.append(
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#333"/>'
    )
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">output tokens/s</text>')
    out.append(
        f'<text x="16" y="{h / 2}" text-anchor="middle" transform="rotate(-90 16 {h / 2})">'
        "latency (ms, log)</text>"
    )
    for k, (label, color, pts) in enumerate(series):
        if pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        ly = top + 10 + 18 * k
        out.append(
            f'<line x1="{w - right + 12}" x2="{w - right + 32}" y1="{ly}" y2="{ly}" stroke="{color}" '
            f'stroke-width="2"/><text x="{w - right + 38}" y="{ly + 4}">{_esc(label)}</text>'
        )
    out.append("</svg>\n")
    return "\n".join(out)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------- main


async def _server_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(args.base_url.rstrip("/") + "/v1/models", headers=headers)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])


async def _warm_up(args: argparse.Namespace, model: str) -> None:
    """A few requests one at a time, so first-request costs on the server stay out of the first rate."""
    if args.warmup_requests == 0:
        return
    # a seed no rate uses (rate i uses seed + i), so the warm-up leaves nothing in the prefix cache for them
    seed = args.seed + len(args.rate)
    wl = synthetic(args.warmup_requests, args.isl, min(args.osl, 16), args.vocab_size, seed=seed)
    report = await run_rate(args, model, wl, math.inf, concurrency=1)
    if report["failed"]:
        raise RuntimeError(f"the warm-up requests failed: {report['errors']}")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    model = await _server_model(args)
    await _warm_up(args, model)
    report: dict[str, Any] = {
        "kind": "serve",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "base_url": args.base_url,
        "model": model,
        "workload": {
            "num_requests": args.num_requests,
            "isl": args.isl,
            "osl": args.osl,
            "seed": args.seed,
            "warmup_requests": args.warmup_requests,
            "ignore_eos": not args.no_ignore_eos,
        },
        "settings": {
            "rates": [r if math.isfinite(r) else "inf" for r in args.rate],
            "concurrency": args.concurrency,
        },
        "results": [],
    }
    for i, rate in enumerate(args.rate):
        wl = synthetic(args.num_requests, args.isl, args.osl, args.vocab_size, seed=args.seed + i)
        report["results"].append(await run_rate(args, model, wl, rate))
    return report


def main(args: argparse.Namespace) -> int:
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    for name in ("num_requests", "isl", "osl", "vocab_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if any(not r > 0 for r in args.rate):
        raise ValueError(f"--rate values must be > 0 (inf for all at once), got {args.rate}")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise RuntimeError("kiln bench serve needs httpx: pip install httpx") from None
    report = asyncio.run(_run(args))
    print(render(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        write_plot(report, args.plot)
    return 0 if all(r["completed"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="kiln bench serve")).parse_args()))
