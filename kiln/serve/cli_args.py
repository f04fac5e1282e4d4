"""Command-line arguments of `kiln serve`. Imports nothing heavy: `kiln --help` stays fast."""

from __future__ import annotations

import argparse


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `kiln serve [MODEL]` to ``parser`` and return it."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model directory (HF checkpoint or built kiln engine); omitted: the embedded demo model",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model id reported by /v1/models and accepted in requests (default: the model directory name)",
    )

    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    net.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    net.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $KILN_API_KEY)",
    )

    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", help="weight / activation dtype (default auto)")
    eng.add_argument("--device", default=None, help="device (default: cuda when present, else cpu)")
    eng.add_argument(
        "--max-batch-size", type=int, default=None,
        help="most sequences in one step (default: an engine's built limit, else 256)",
    )  # fmt: skip
    eng.add_argument(
        "--max-num-tokens", type=int, default=None,
        help="most tokens in one step (default: an engine's built limit, else whole GEMM waves of the GPU: "
        "8448 on an H100)",
    )  # fmt: skip
    eng.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument(
        "--kv-cache-max-tokens", type=int, default=None, help="cap of the KV cache pool, in tokens"
    )
    eng.add_argument(
        "--kv-cache-free-memory-fraction",
        type=float,
        default=0.9,
        help="share of the free device memory given to the KV cache (default 0.9)",
    )
    eng.add_argument(
        "--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prompt prefixes"
    )
    eng.add_argument(
        "--scheduler-policy",
        default="guaranteed_no_evict",
        choices=["guaranteed_no_evict", "max_utilization"],
    )
    eng.add_argument("--executor", default="auto", help="auto | thread | process (default auto)")
    eng.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling (default 0)")

    api = parser.add_argument_group("API")
    api.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template file replacing the one in the tokenizer config",
    )
    api.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting for their first token beyond which new ones get 503 (default 1024)",
    )
    api.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for (default 16)")
    api.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="largest logprobs / top_logprobs (default 20, at most 20)",
    )
    api.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request body in bytes; larger gets 413 (default 8 MiB)",
    )
    api.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run after SIGTERM before they are aborted (default 30)",
    )

    log = parser.add_argument_group("logging")
    log.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    log.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        help="seconds between engine status lines; 0 turns them off (default 10)",
    )
    log.add_argument("--no-request-log", action="store_true", help="no per-request log line")
    log.add_argument("--access-log", action="store_true", help="also print uvicorn's access log")
    return parser


def build_parser(prog: str = "kiln serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model over an OpenAI-compatible HTTP API.",
    )
    return add_serve_arguments(parser)
