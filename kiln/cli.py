"""The `kiln` command: build, generate, serve, bench."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.sampling_params import SamplingParams


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
    p.add_argument("--max-batch-size", type=int, default=None, help="default: 64, or a built engine's limit")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build an engine directory from a Hugging Face checkpoint",
        description="Convert a Hugging Face checkpoint directory into a kiln engine directory: plan.json, "
        "the weights converted to --dtype with q|k|v and gate|up fused (rank0*.safetensors), and the "
        "config and tokenizer files. Load it with LLM(DIR) or `kiln generate --model DIR`: start-up "
        "reads the weights as they are, and the limits given here are the engine's defaults and ceilings.",
    )
    p.add_argument("model", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--output", "-o", required=True, help="engine directory to write (new or empty)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = the checkpoint's on a GPU, float32 on the CPU (default: auto)",
    )
    p.add_argument(
        "--device", default=None, help="device kind the engine is for: cpu or cuda (default: cuda if present)"
    )
    p.add_argument("--max-batch-size", type=int, default=256, help="most sequences per step (default: 256)")
    p.add_argument(
        "--max-num-tokens",
        type=int,
        default=None,
        help="most tokens per step (default: 64 x the GPU's SMs nearest 8,192, i.e. 8,448 on an H100; "
        "8,192 without a GPU)",
    )
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="longest sequence (default: max_position_embeddings)"
    )
    p.add_argument(
        "--tokens-per-block", type=int, default=32, choices=[8, 16, 32, 64, 128], help="KV block size"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an engine already in --output")


def _run_build(args: argparse.Namespace) -> int:
    from kiln.builder.build import build_engine

    result = build_engine(
        args.model,
        args.output,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        tokens_per_block=args.tokens_per_block,
        overwrite=args.overwrite,
    )
    plan = result.plan
    files = ", ".join(plan.weight_files)
    print(f"built {plan.architecture} engine from {plan.source}")
    print(f"  output     {os.path.abspath(result.engine_dir)}")
    print(f"  dtype      {plan.dtype} (for {plan.device})")
    print(
        f"  limits     max_batch_size={plan.max_batch_size} max_num_tokens={plan.max_num_tokens} "
        f"max_seq_len={plan.max_seq_len} tokens_per_block={plan.tokens_per_block}"
    )
    print(f"  weights    {plan.num_tensors} tensors, {plan.weight_bytes / 2**20:.1f} MiB in {files}")
    print(f"  took       {result.seconds:.2f} s")
    return 0


def _sampling_params(args: argparse.Namespace, model: str) -> SamplingParams:
    """The request's SamplingParams: the flags over the model's generation_config.json defaults.
    Built before the engine starts, so a bad flag fails in a moment rather than after the load."""
    from kiln import SamplingParams
    from kiln.model_files import read_model_files

    defaults = SamplingParams(**read_model_files(model).sampling_defaults)
    return SamplingParams(
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


def _run_generate(args: argparse.Namespace) -> int:
    from kiln import LLM
    from kiln.demo import demo_model_path

    sp = _sampling_params(args, args.model or demo_model_path())
    # a built engine's limits come from its plan; a checkpoint gets a small default
    engine = bool(args.model) and os.path.isfile(os.path.join(args.model, "plan.json"))
    batch = args.max_batch_size if args.max_batch_size is not None or engine else 64
    with LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=batch,
        max_num_tokens=None if engine or batch is None else max(2048, batch),
        max_seq_len=args.max_seq_len,
    ) as llm:
        print(f"kiln: {llm.startup_summary()}", file=sys.stderr)
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
    _add_build(sub)
    _add_generate(sub)
    commands = {"build": _run_build, "generate": _run_generate}
    try:
        from kiln.serve import cli_args as serve_args
    except ImportError:
        serve_args = None  # type: ignore[assignment]
    if serve_args is not None:
        p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
        serve_args.add_serve_arguments(p)

        def _serve(args: argparse.Namespace) -> int:
            from kiln.serve import main as serve_main

            check_serve_kv_flags(args)
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
    except OSError as e:  # a missing weights file, an output path that cannot be made: the user's input
        print(f"kiln {args.command}: error: {os_error_text(e)}", file=sys.stderr)
        return 2


def os_error_text(e: OSError) -> str:
    """kiln's own messages as they are; for the system's, "No such file or directory: 'PATH'"."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename!r}"
    return str(e)


def check_serve_kv_flags(args: argparse.Namespace) -> None:
    """The KV flags, checked before the server binds or loads anything, in the flags' names (KvCacheConfig
    names its fields, and its max_tokens reads like the sampling parameter)."""
    from kiln.config import KvCacheConfig

    fraction, cap = args.kv_cache_free_memory_fraction, args.kv_cache_max_tokens
    try:
        KvCacheConfig(free_gpu_memory_fraction=fraction)
    except ValueError:
        raise ValueError(f"--kv-cache-free-memory-fraction must be in (0, 1], got {fraction}") from None
    if cap is None:
        return
    block = KvCacheConfig().tokens_per_block
    if args.model and os.path.isfile(os.path.join(args.model, "plan.json")):  # a built engine's block size
        from kiln.builder.engine_dir import EnginePlan

        block = EnginePlan.load(args.model).tokens_per_block
    try:
        KvCacheConfig(max_tokens=cap, tokens_per_block=block)
    except ValueError:
        raise ValueError(
            f"--kv-cache-max-tokens must be at least one KV block ({block} tokens), got {cap}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
