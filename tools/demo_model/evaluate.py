"""Held-out evaluation of the exported demo models, as transformers loads them (fp32 on the CPU).

Writes kiln/demo/metrics.json (the bounds tests/test_demo_model.py checks) and, once, the small
held-out sample the tests score (tests/data/demo_heldout_sample.txt).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from demo_model import corpus
from demo_model.presets import CONTEXT, SEED

_SAMPLE_DOCS, _SAMPLE_CHARS = 6, 2500  # ~4k tokens: scored in a second or two on a CPU


def sample_text(test_text: str) -> str:
    """Leading lines of test documents spread over the split (they never touch training)."""
    docs = [d for d in test_text.split(corpus.EOS) if d]
    picks = [docs[round(i * (len(docs) - 1) / (_SAMPLE_DOCS - 1))] for i in range(_SAMPLE_DOCS)]
    parts = []
    for d in picks:
        keep, n = [], 0
        for line in d.splitlines(keepends=True):
            if n + len(line) > _SAMPLE_CHARS:
                break
            keep.append(line)
            n += len(line)
        parts.append("".join(keep))
    return "\n\n".join(parts)


@torch.no_grad()
def text_loss(model, ids: list[int], ctx: int = CONTEXT) -> float:
    """Mean next-token loss over non-overlapping windows of `ids` (the way the tests score)."""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = torch.tensor(ids[s : s + ctx + 1])[None]  # [1, <= ctx + 1]
        logits = model(input_ids=w[:, :-1], use_cache=False).logits[0]  # [len, V]
        total += float(torch.nn.functional.cross_entropy(logits.float(), w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    return total / count


def evaluate_exported(
    demo_dir: Path, corpus_dir: Path, sample_path: Path, log: Callable[[str], None]
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo_model.train import evaluate

    torch.manual_seed(SEED)
    meta = json.loads((corpus_dir / "bin" / "meta.json").read_text())
    test_ids = np.fromfile(corpus_dir / "bin" / "test.bin", dtype=np.uint16).astype(np.int64)
    if not sample_path.exists():
        sample_path.parent.mkdir(parents=True, exist_ok=True)
        sample_path.write_text(sample_text((corpus_dir / "text" / "test.txt").read_text()))
    sample = sample_path.read_text()
    results: dict = {}
    for name in ("base", "draft"):
        path = demo_dir / name
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        loss, n = evaluate(model, torch.from_numpy(test_ids), CONTEXT, 8, torch.device("cpu"))
        sample_ids = tok(sample)["input_ids"]
        s_loss = text_loss(model, sample_ids)
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
        results[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "dir_bytes": sum(files.values()),
            "files": files,
            "test_tokens": n,
            "test_loss": loss,
            "test_ppl": math.exp(loss),
            "test_bits_per_byte": loss * n / math.log(2) / meta["test"]["bytes"],
            "sample_tokens": len(sample_ids) - 1,
            "sample_ppl": math.exp(s_loss),
        }
        log(
            f"{name}: test ppl {math.exp(loss):.3f} ({n:,} tokens, {time.perf_counter() - t0:.0f} s), "
            f"bits/byte {results[name]['test_bits_per_byte']:.3f}, sample ppl {math.exp(s_loss):.3f}"
        )
        prompt = tok("def fibonacci(n):", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=64, do_sample=False)
        log(f"{name} greedy:\n{tok.decode(out[0], skip_special_tokens=True)}\n---")
    results["measured_with"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": "cpu",
        "dtype": "float32 (weights stored in bfloat16)",
    }
    (demo_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
