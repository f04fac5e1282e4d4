"""Train kiln's embedded demo models (kiln/demo/base, kiln/demo/draft) from the Python stdlib.

Stages, each reproducible with the fixed seed in tools/demo_model/presets.py:

  corpus     list the stdlib sources of this interpreter, split them by a hash of the path, write
             .corpus/text/{train,valid,test}.txt and compare with the recorded manifest
  tokenizer  train the byte-level BPE on the train text, encode every split to .corpus/bin/*.bin
  train      train the recipes (GPU), write bf16 weight shards and metrics.json to --out
  export     turn a train output folder into the HF layout under kiln/demo/{base,draft}
  eval       held-out perplexity of the exported models (CPU), the test sample, kiln/demo/metrics.json

The models shipped were made with: corpus, tokenizer (Python 3.11.7, CPU); train on one H100
(`--out $OUT`); export and eval (CPU). See kiln/demo/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_model import corpus  # noqa: E402
from demo_model.presets import CONTEXT, RECIPES, SEED, VOCAB_SIZE  # noqa: E402

CORPUS_DIR = REPO / ".corpus"
MANIFEST = REPO / "tools" / "demo_model" / "stdlib_manifest.tsv"
DEMO_DIR = REPO / "kiln" / "demo"
SAMPLE = REPO / "tests" / "data" / "demo_heldout_sample.txt"
SPLITS = ("train", "valid", "test")


def log(msg: str) -> None:
    print(msg, flush=True)


def stage_corpus(args) -> None:
    files = corpus.collect()
    lines = corpus.manifest_lines(files)
    if args.write_manifest or not MANIFEST.exists():
        MANIFEST.write_text("\n".join(lines) + "\n")
        log(f"wrote {MANIFEST} ({len(files)} files)")
    else:
        diffs = corpus.compare_manifest(files, MANIFEST.read_text().splitlines())
        if diffs:
            log(f"warning: this stdlib differs from {MANIFEST.name} in {len(diffs)} files, e.g.")
            for d in diffs[:10]:
                log(f"  {d}")
        else:
            log(f"corpus matches {MANIFEST.name} ({len(files)} files)")
    out = CORPUS_DIR / "text"
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        docs = corpus.documents(files, split, with_chat=split == "train")
        text = "".join(docs)
        (out / f"{split}.txt").write_text(text)
        log(f"{split}: {len(docs)} documents, {len(text.encode()):,} bytes")


def _docs(split: str) -> list[str]:
    text = (CORPUS_DIR / "text" / f"{split}.txt").read_text()
    return [corpus.EOS + d for d in text.split(corpus.EOS) if d]


def stage_tokenizer(args) -> None:
    import numpy as np
    from demo_model.tokenizer import train_tokenizer, write_hf_tokenizer

    train_docs = _docs("train")
    t0 = time.perf_counter()
    # The separator is a special token: BPE never merges across it, so strip it for training.
    tok = train_tokenizer((d[len(corpus.EOS) :] for d in train_docs), VOCAB_SIZE)
    log(f"tokenizer trained in {time.perf_counter() - t0:.1f} s, vocab {tok.get_vocab_size()}")
    write_hf_tokenizer(tok, CORPUS_DIR / "tokenizer", CONTEXT)
    meta = {"vocab_size": tok.get_vocab_size(), "seed": SEED, "python": sys.version.split()[0]}
    tok_json = (CORPUS_DIR / "tokenizer" / "tokenizer.json").read_bytes()
    meta["tokenizer_sha256"] = hashlib.sha256(tok_json).hexdigest()
    (CORPUS_DIR / "bin").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        docs = train_docs if split == "train" else _docs(split)
        ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        arr = np.fromiter((t for seq in ids for t in seq), dtype=np.uint16)
        arr.tofile(CORPUS_DIR / "bin" / f"{split}.bin")
        nbytes = sum(len(d.encode()) - len(corpus.EOS) for d in docs)
        meta[split] = {"documents": len(docs), "tokens": int(arr.size), "bytes": nbytes}
        log(f"{split}: {arr.size:,} tokens, {nbytes / arr.size:.2f} bytes/token")
    (CORPUS_DIR / "bin" / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def stage_train(args) -> None:
    import torch
    import transformers
    from demo_model.train import evaluate, load_tokens, save_shards, train

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    bin_dir = CORPUS_DIR / "bin"
    meta = json.loads((bin_dir / "meta.json").read_text())
    if meta["vocab_size"] != VOCAB_SIZE:
        raise SystemExit(f"corpus has vocab {meta['vocab_size']}, presets {VOCAB_SIZE}: rerun `tokenizer`")
    tokens = {s: load_tokens(bin_dir, s) for s in SPLITS}
    if args.eval_limit:
        tokens.update({s: tokens[s][: args.eval_limit] for s in ("valid", "test")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    log(f"environment: {env}")
    runs = {}
    best_base: tuple[float, str] | None = None
    t_all = time.perf_counter()
    for name in args.recipes.split(","):
        r = RECIPES[name]
        res = train(
            r,
            tokens["train"],
            tokens["valid"],
            device,
            log,
            steps=_steps_for(args.steps, name),
            batch=args.batch,
            ctx=args.context,
        )
        model = _model_with(r, res.state, device)
        test_t = torch.from_numpy(tokens["test"].astype("int64")).to(device)
        test_loss, n = evaluate(model, test_t, args.context, 64 if device.type == "cuda" else 4, device)
        info = {k: v for k, v in vars(res).items() if k != "state"}
        info.update(test_loss=test_loss, test_ppl=float(torch.tensor(test_loss).exp()), test_tokens=n)
        info["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        runs[name] = info
        log(
            f"[{name}] best step {res.best_step}: valid {res.best_valid_loss:.4f}, test {test_loss:.4f} "
            f"(ppl {info['test_ppl']:.2f}), {res.train_seconds:.0f} s, {res.tokens_per_second:,.0f} tok/s"
        )
        save_shards(res.state, out, name, tied=True)
        if r.model == "base" and (best_base is None or res.best_valid_loss < best_base[0]):
            best_base = (res.best_valid_loss, name)
        del model, res
    selected = {"base": best_base[1] if best_base else None}
    if any(RECIPES[n].model == "draft" for n in runs):
        selected["draft"] = next(n for n in runs if RECIPES[n].model == "draft")
    summary = {"env": env, "runs": runs, "selected": selected, "wall_seconds": time.perf_counter() - t_all}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps({n: {k: runs[n][k] for k in ("steps", "best_valid_loss", "test_ppl")} for n in runs}))
    log(f"selected: {selected}")


def _steps_for(spec: str | None, recipe: str) -> int | None:
    """`--steps 500` fixes every recipe; `--steps base-b=3635,draft=3440` fixes the ones named."""
    if not spec:
        return None
    if "=" not in spec:
        return int(spec)
    pairs = dict(item.split("=") for item in spec.split(","))
    return int(pairs[recipe]) if recipe in pairs else None


def _model_with(r, state, device):
    from demo_model.train import build_model

    model = build_model(r.shape, device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def stage_export(args) -> None:
    import torch
    from demo_model.train import load_shards
    from transformers import GenerationConfig

    src = Path(args.src)
    metrics = json.loads((src / "metrics.json").read_text())
    for model_name in ("base", "draft"):
        recipe_name = metrics["selected"].get(model_name)
        if recipe_name is None:
            continue
        r = RECIPES[recipe_name]
        model = _model_with(r, load_shards(src, recipe_name), torch.device("cpu")).to(torch.bfloat16)
        dest = DEMO_DIR / model_name
        if dest.exists():
            shutil.rmtree(dest)
        model.generation_config = GenerationConfig(
            bos_token_id=0, eos_token_id=[0, 4], pad_token_id=0, do_sample=True, temperature=0.7, top_p=0.95
        )
        model.save_pretrained(dest)
        cfg = json.loads((dest / "config.json").read_text())
        cfg.setdefault("rope_theta", 10000.0)  # for readers that predate `rope_parameters`
        cfg.setdefault("torch_dtype", "bfloat16")
        (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(CORPUS_DIR / "tokenizer" / f, dest / f)
        size = sum(p.stat().st_size for p in dest.iterdir())
        log(f"exported {recipe_name} -> {dest} ({size / 1e6:.1f} MB)")
    shutil.copy(src / "metrics.json", DEMO_DIR / "training_metrics.json")


def stage_eval(args) -> None:
    from demo_model.evaluate import evaluate_exported

    evaluate_exported(DEMO_DIR, CORPUS_DIR, SAMPLE, log)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--write-manifest", action="store_true", help="record this interpreter's file list")
    sub.add_parser("tokenizer")
    t = sub.add_parser("train")
    t.add_argument("--recipes", default="base-a,base-b,draft", help=f"comma list of {sorted(RECIPES)}")
    t.add_argument("--device", default="cuda")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", default=None, help="N or recipe=N,... (default: what fits max_seconds)")
    t.add_argument("--batch", type=int, default=None, help="override the recipes' batch (smoke tests)")
    t.add_argument("--context", type=int, default=CONTEXT, help="window length (smoke tests)")
    t.add_argument("--eval-limit", type=int, default=None, help="evaluate on this many tokens (smoke tests)")
    e = sub.add_parser("export")
    e.add_argument("--src", required=True, help="a `train --out` folder")
    sub.add_parser("eval")
    args = p.parse_args(argv)
    {
        "corpus": stage_corpus,
        "tokenizer": stage_tokenizer,
        "train": stage_train,
        "export": stage_export,
        "eval": stage_eval,
    }[args.stage](args)


if __name__ == "__main__":
    main()
