"""The `kiln` command: generate, serve, bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: model's)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")


def _run_generate(args: argparse.Namespace) -> int:
    from kiln import LLM, SamplingParams

    with LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_tokens=max(2048, args.max_batch_size),
        max_seq_len=args.max_seq_len,
    ) as llm:
        defaults = llm.default_sampling_params()
        sp = SamplingParams(
            n=args.n,
            temperature=defaults.temperature if args.temperature is None else args.temperature,
            top_k=defaults.top_k if args.top_k is None else args.top_k,
            top_p=defaults.top_p if args.top_p is None else args.top_p,
            min_p=defaults.min_p if args.min_p is None else args.min_p,
            repetition_penalty=defaults.repetition_penalty
            if args.repetition_penalty is None
            else args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            max_tokens=args.max_tokens,
        )
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], sp)
        else:
            outs = llm.generate(list(args.prompts), sp)
        for prompt, out in zip(args.prompts, outs, strict=True):
            for c in out.outputs:
                head = f"--- {prompt!r}" + (f" [{c.index}]" if args.n > 1 else "")
                print(f"{head} ({c.finish_reason}, {len(c.token_ids)} tokens)")
                print((prompt if not args.chat else "") + c.text)
        n_req, n_tok, secs = llm.last_generate_summary
        print(
            f"{n_req} requests, {n_tok} tokens in {secs:.2f} s: {n_tok / max(secs, 1e-9):.1f} tok/s "
            f"({llm.engine_info['device']}, {llm.engine_info['dtype']})",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    commands = {"generate": _run_generate}
    try:
        from kiln.serve import cli_args as serve_args
    except ImportError:
        serve_args = None  # type: ignore[assignment]
    if serve_args is not None:
        p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
        serve_args.add_serve_arguments(p)

        def _serve(args: argparse.Namespace) -> int:
            from kiln.serve import main as serve_main

            return serve_main(args) or 0

        commands["serve"] = _serve
    try:
        from kiln.bench import cli as bench_cli
    except ImportError:
        bench_cli = None  # type: ignore[assignment]
    if bench_cli is not None:
        p = sub.add_parser("bench", help="benchmarks: throughput, latency, serve")
        bench_cli.add_arguments(p)
        commands["bench"] = bench_cli.main
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except (ValueError, RuntimeError) as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
