"""kiln bench: workloads, presets, random checkpoints, roofline arithmetic, reports, and a CPU run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random

import numpy as np
import pytest
import torch

from kiln.bench import report as rep
from kiln.bench.checkpoint import byte_to_char, num_parameters, weight_shapes, write_random_checkpoint
from kiln.bench.presets import PRESETS, get_preset, materialize_preset, preset_key, resolve_model
from kiln.bench.roofline import DevicePeaks, ModelCost, device_peaks, serial_bound
from kiln.bench.workloads import nano_vllm, synthetic

H100 = DevicePeaks(3.0e12, 794e12, "configured")

# Published parameter counts of the checkpoints the presets copy (tied embeddings counted once).
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "qwen3-0.6b": 596_049_920,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b": 7_248_023_552,
}


def _engine_importable() -> bool:
    try:
        return importlib.util.find_spec("kiln.engine.model_engine") is not None and bool(
            __import__("kiln.engine.model_engine")
        )
    except Exception:  # noqa: BLE001 - any import failure means the engine is not there yet
        return False


# ---------------------------------------------------------------- workloads


def test_synthetic_is_deterministic_and_exact():
    a = synthetic(16, 128, 64, vocab_size=1000, seed=3)
    b = synthetic(16, 128, 64, vocab_size=1000, seed=3)
    c = synthetic(16, 128, 64, vocab_size=1000, seed=4)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert a.prompts != c.prompts
    assert a.input_lens == [128] * 16 and a.output_lens == [64] * 16
    ids = np.concatenate([np.asarray(p) for p in a.prompts])
    assert ids.min() >= 0 and ids.max() < 1000 and len(set(ids.tolist())) > 500
    assert a.num_input_tokens == 16 * 128 and a.num_output_tokens == 16 * 64
    assert a.max_seq_len == 192 and a.temperature == 0.0


def test_synthetic_length_spread():
    w = synthetic(2000, 100, 50, vocab_size=50, isl_stdev=20, osl_stdev=10, seed=0)
    il, ol = np.asarray(w.input_lens), np.asarray(w.output_lens)
    assert il.min() >= 1 and il.max() <= 200 and ol.min() >= 1 and ol.max() <= 100
    assert abs(il.mean() - 100) < 2 and abs(il.std() - 20) < 2
    assert abs(ol.mean() - 50) < 1 and abs(ol.std() - 10) < 1
    assert [len(p) for p in w.prompts] == w.input_lens
    with pytest.raises(ValueError, match="isl must be >= 1"):
        synthetic(1, 0, 1, vocab_size=10)


def test_nano_vllm_workload_matches_its_bench():
    state = random.getstate()
    w = nano_vllm()
    assert random.getstate() == state  # the global generator is left alone
    # nano-vllm's bench.py, drawn with the global generator in its order.
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    outs = [random.randint(100, 1024) for _ in range(256)]
    random.setstate(state)
    assert w.prompts == prompts and w.output_lens == outs
    assert w.num_output_tokens == 133_966  # the total nano-vllm's README reports for this workload
    assert all(100 <= n <= 1024 for n in w.input_lens + w.output_lens)
    assert all(0 <= t <= 10000 for p in w.prompts for t in p)
    assert w.temperature == 0.6 and w.max_model_len == 4096 and w.num_requests == 256
    sub = w.subsample(10)
    assert sub.prompts == w.prompts[:10] and sub.params["subsample_of"] == 256


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_build_in_transformers(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    p = get_preset(name)
    (tmp_path / "config.json").write_text(json.dumps(p.config))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == p.config["model_type"]
    with torch.device("meta"):  # no memory: an 8B / 70B model is only shapes here
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == p.config["architectures"][0]
    ours = dict(weight_shapes(p.config))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if p.config.get("tie_word_embeddings"):
        theirs.pop("lm_head.weight")  # an alias of the embedding, not a tensor of the checkpoint
    assert ours == theirs
    assert num_parameters(p.config) == sum(t.numel() for t in model.parameters())
    if name in PUBLISHED_PARAMS:
        assert num_parameters(p.config) == PUBLISHED_PARAMS[name]


def test_preset_details():
    for name, factor in (("llama-3.1-8b", 8.0), ("llama-3.1-70b", 8.0), ("llama-3.2-1b", 32.0)):
        c = get_preset(name).config
        assert c["rope_scaling"] == {
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
        assert c["rope_theta"] == 500000.0 and c["max_position_embeddings"] == 131072
        assert c["bos_token_id"] == 128000 and 128009 in c["eos_token_id"]
    assert get_preset("llama-3.2-1b").config["tie_word_embeddings"] is True
    assert get_preset("qwen3-0.6b").config["tie_word_embeddings"] is True
    assert get_preset("llama-3.1-8b").config["tie_word_embeddings"] is False
    assert get_preset("preset:qwen3-0.6b").name == "qwen3-0.6b"
    with pytest.raises(ValueError, match="unknown preset 'gpt-9'.*llama-3.1-8b"):
        get_preset("gpt-9")
    with pytest.raises(ValueError, match="model directory with config.json or preset:NAME"):
        resolve_model("/nonexistent/model")


def test_tiny_preset_materialises_loads_and_is_cached(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model("preset:tiny-llama", str(tmp_path), device="cpu")
    assert name == "tiny-llama" and os.path.isfile(os.path.join(path, ".complete"))
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sd = model.state_dict()
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert 0.015 < w.std().item() < 0.025
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert materialize_preset("tiny-llama", str(tmp_path), device="cpu") == path  # reused, not rewritten
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    p = get_preset("tiny-llama")
    assert preset_key(p, "float32", 0) != preset_key(p, "float32", 1)
    assert preset_key(p, "float32", 0) != preset_key(p, "bfloat16", 0)


def test_sharded_random_checkpoint_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = get_preset("tiny-qwen2").config  # q/k/v biases
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    names = write_random_checkpoint(str(tmp_path), cfg, dtype="float32", device="cpu", shard_bytes=100_000)
    assert len(names) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in weight_shapes(cfg)}
    assert index["metadata"]["total_size"] == 4 * num_parameters(cfg)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from kiln.bench.checkpoint import write_byte_tokenizer

    p = get_preset("mistral-7b")  # its special tokens sit on ids 0-2, where bytes would go
    write_byte_tokenizer(str(tmp_path), p.special_tokens, p.bos_token, p.eos_token, 32768)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "héllo wörld ✓ \x00\t"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()) and min(ids) >= 3
    assert tok.decode(ids) == text
    assert tok.decode([30000, 31999]) == ""  # ids only the model knows decode to nothing
    assert len(set(byte_to_char())) == 256


def test_byte_tokenizer_covers_the_model_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    from kiln.bench.checkpoint import write_byte_tokenizer

    p = get_preset("llama-3.1-8b")  # special tokens at the top: 128000 and up
    vocab = p.config["vocab_size"]
    write_byte_tokenizer(str(tmp_path), p.special_tokens, p.bos_token, p.eos_token, 8192, vocab_size=vocab)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == vocab and tok.eos_token_id == p.special_tokens[p.eos_token]
    words = [tok.decode([i]) for i in range(256, 128000)]
    assert len(set(words)) == len(words)  # every generated id has its own text
    assert all(w[0] == " " and 3 <= len(w) <= 5 and w[1:].isalpha() for w in words)
    text = "héllo ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # text still round-trips


# ---------------------------------------------------------------- roofline


def test_roofline_llama_8b_bs1():
    cost = ModelCost.from_config(get_preset("llama-3.1-8b").config, "bfloat16")
    # Layers + LM head in bf16: the published 8.03B less the 128256 x 4096 embedding table.
    assert cost.step_weight_bytes == 2 * (8_030_261_248 - 128256 * 4096)
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    b = serial_bound(cost, [128], [256], H100)
    assert b.decode_steps == 255 and b.num_steps == 256 and b.memory_bound_steps == 256
    assert 14.5e9 < b.mean_decode_step_bytes < 16.5e9
    tok_s = b.decode_steps / b.decode_seconds
    assert abs(tok_s - 200) / 200 < 0.03
    faster = serial_bound(cost, [128], [256], DevicePeaks(6.0e12, 794e12, "configured"))
    assert faster.seconds == pytest.approx(b.seconds / 2, rel=1e-9)


def test_roofline_step_arithmetic_and_schedule():
    cfg = get_preset("tiny-llama").config
    cost = ModelCost.from_config(cfg, "float32")
    # One request, 4-token prompt: a prefill step of 4 tokens then decodes at context 4, 5.
    nbytes, flops = cost.step_cost(np.array([0]), np.array([4]), 1)
    kvb = cost.kv_bytes_per_token
    assert nbytes == cost.step_weight_bytes + 4 * kvb + 4 * kvb + 4 * 64 * 4
    attn_keys = 1 + 2 + 3 + 4
    assert flops == 2 * cost.dense_params * 4 + 2 * cost.lm_head_params + 4 * 2 * 4 * 16 * attn_keys
    # Two requests, one sequence at a time: prefill A, decode A, prefill B (B makes one token only).
    b = serial_bound(cost, [3, 5], [2, 1], H100, max_batch_size=1, max_num_tokens=8)
    assert (b.num_steps, b.decode_steps, b.output_tokens, b.total_tokens) == (3, 1, 3, 11)
    steps = [cost.step_cost(np.array([0]), np.array([3]), 1), cost.step_cost(np.array([3]), np.array([1]), 1)]
    steps.append(cost.step_cost(np.array([0]), np.array([5]), 1))
    expect = sum(max(x / H100.hbm_bytes_per_s, f / H100.flops_per_s) for x, f in steps)
    assert b.seconds == pytest.approx(expect, rel=1e-12)
    # A budget of 4 tokens splits B's prompt into chunks of 3 (beside A's decode) and 2.
    c = serial_bound(cost, [3, 5], [2, 1], H100, max_batch_size=2, max_num_tokens=4)
    assert c.num_steps == 3 and c.decode_steps == 0


def test_roofline_big_prefill_is_compute_bound():
    cost = ModelCost.from_config(get_preset("llama-3.1-8b").config, "bfloat16")
    b = serial_bound(cost, [8192], [1], H100, max_batch_size=1, max_num_tokens=8192)
    assert b.num_steps == 1 and b.memory_bound_steps == 0
    _, flops = cost.step_cost(np.array([0]), np.array([8192]), 1)
    assert b.seconds == pytest.approx(flops / 794e12)
    assert device_peaks("configured", "cpu") == H100
    assert device_peaks("auto", "NVIDIA H100 80GB HBM3").source == "configured"
    assert device_peaks("auto", "x", hbm=1e12).hbm_bytes_per_s == 1e12


# ---------------------------------------------------------------- reports


def _report() -> dict:
    r = rep.new_report("throughput", ["kiln", "bench", "throughput", "--model", "preset:a|b"])
    r["model"] = {"name": "tiny"}
    r["roofline"] = {
        "bound": 1000.0,
        "bound_unit": "output tok/s",
        "hbm_bytes_per_s": 3e12,
        "flops_per_s": 7.94e14,
        "peaks_source": "configured",
    }
    r["results"]["kiln"] = {
        "num_requests": 8,
        "output_tok_s": np.float64(512.25),
        "ttft_ms": rep.percentiles([0.010, 0.020, 0.030], 1e3),
        "roofline_share": 0.51225,
        "notes": ["a kiln note"],
    }
    r["results"]["hf"] = {
        "num_requests": 4,
        "output_tok_s": 128.0,
        "scope": "4 requests, batch 4",
        "notes": [],
    }
    return r


def test_percentiles():
    p = rep.percentiles(list(range(1, 101)), scale=2.0)
    assert p["p50"] == pytest.approx(101.0) and p["p99"] == pytest.approx(198.02) and p["mean"] == 101.0
    assert rep.percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_report_json_table_and_markdown(tmp_path):
    r = _report()
    assert r["command"] == "kiln bench throughput --model 'preset:a|b'"
    for key in ("card", "torch", "triton", "transformers"):
        assert r["env"][key]
    out = tmp_path / "sub" / "r.json"
    rep.write_json(r, str(out))
    back = json.loads(out.read_text())
    assert back["results"]["kiln"]["output_tok_s"] == 512.25 and back["kind"] == "throughput"
    table = rep.render_table(r)
    assert table.splitlines()[-1].startswith("  note")
    assert "512" in table and "128" in table and "51.2%" in table and "20.00" in table
    assert "roofline bound" in table and "a kiln note" in table
    row = rep.markdown_row(r)
    cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
    assert len(cells) == 6
    assert "preset:a\\|b" in cells[3]
    assert cells[4] == "512.2 output tok/s (51% of bound)" and cells[5].startswith("128.0 output tok/s")
    assert rep.failed_backends(r) == []

    def boom() -> dict:
        raise RuntimeError("no engine\nsecond line")

    r["results"]["hf"] = rep.guarded("hf", boom)
    assert rep.failed_backends(r) == ["hf"] and r["results"]["hf"]["error"].startswith(
        "RuntimeError: no engine"
    )
    assert "hf failed: RuntimeError: no engine" in rep.render_table(r)
    assert rep.markdown_row(r).rstrip().endswith("| failed |")
    r["results"]["hf"] = {
        "num_requests": 4,
        "output_tok_s": 128.0,
        "scope": "4 requests, batch 4",
        "notes": [],
    }
    md = tmp_path / "RESULTS.md"
    rep.append_results(r, str(md))
    rep.append_results(r, str(md))
    text = md.read_text()
    assert text.count("| date | card |") == 1 and text.count(row) == 2


# ---------------------------------------------------------------- command line and runs


def _bench_parser() -> argparse.ArgumentParser:
    from kiln.bench import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p


def test_cli_defaults_and_dispatch():
    from kiln.bench import cli

    args = _bench_parser().parse_args(["throughput", "--model", "preset:tiny-llama"])
    assert (args.num_requests, args.isl, args.osl, args.backend, args.workload) == (
        512,
        128,
        128,
        "kiln",
        "synthetic",
    )
    args = _bench_parser().parse_args(["latency", "--model", "m", "--backend", "both"])
    assert (args.isl, args.osl, args.batch_size, args.iterations, args.warmup) == (128, 256, 1, 5, 1)
    args = _bench_parser().parse_args(["latency", "--osl", "64", "--model", "m x", "--no-hf-compile"])
    assert cli.command_line(args) == "kiln bench latency --model 'm x' --osl 64 --no-hf-compile"
    has_serve = cli._serve_module() is not None
    choices = _bench_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert ("serve" in choices) == has_serve and {"throughput", "latency", "presets"} <= set(choices)
    with pytest.raises(SystemExit):
        _bench_parser().parse_args(["throughput", "--model", "m", "--backend", "vllm"])
    args = _bench_parser().parse_args(["latency", "--model", "m", "--no-compile"])
    assert args.no_compile and "--no-compile" in cli.command_line(args)
    args = _bench_parser().parse_args(["latency", "--model", "m", "--plugin", "linear=skinny_linear"])
    assert cli._plugin_overrides(args.plugin) == (("linear", "skinny_linear"),)
    with pytest.raises(ValueError, match="KIND=NAME"):
        cli._plugin_overrides(["skinny_linear"])


def test_json_keeps_kiln_figures_when_the_peer_never_finishes(tmp_path, monkeypatch):
    """The report is written after each backend: a peer killed by a timeout loses no kiln figure."""
    from kiln.bench import latency
    from kiln.cli import main

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a timeout's signal looks like from inside: nothing after it runs

    monkeypatch.setattr(latency, "_hf_latency", killed)
    out = tmp_path / "l.json"
    argv = ["bench", "latency", "--model", "preset:tiny-llama", "--isl", "8", "--osl", "4", "--iterations",
            "1", "--backend", "both", "--preset-cache", str(tmp_path), "--json", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"kiln"} and r["results"]["kiln"]["decode_tok_s"] > 0


def test_engine_settings_reach_the_llm(monkeypatch):
    import kiln.llm
    from kiln.bench.kiln_backend import EngineSettings, open_llm

    seen: list[dict] = []
    monkeypatch.setattr(kiln.llm, "LLM", lambda **kw: seen.append(kw))
    cublas = (("linear", "cublas_linear"),)
    open_llm("m", EngineSettings(compile=False, piecewise_graphs=False, plugins=cublas))
    open_llm("m", EngineSettings())
    assert (seen[0]["compile"], seen[0]["piecewise_graphs"], seen[0]["plugins"]) == (
        False, False, {"linear": "cublas_linear"})  # fmt: skip
    assert seen[1]["compile"] is None and seen[1]["plugins"] is None


def test_hf_backend_runs_a_tiny_workload(tmp_path):
    from kiln.bench.hf_backend import hf_latency, hf_throughput, load_model

    path = materialize_preset("tiny-qwen3", str(tmp_path), device="cpu")
    model = load_model(path, "auto", "cpu")
    wl = synthetic(5, 12, 6, 512, isl_stdev=3, osl_stdev=2, seed=1)
    res = hf_throughput(model, wl, batch_size=2, device="cpu")
    assert res["num_requests"] == 5 and res["peak_batch"] == 2
    assert res["output_tok_s"] == pytest.approx(wl.num_output_tokens / res["elapsed_s"])
    expect_generated = sum(max(wl.output_lens[i : i + 2]) * len(wl.output_lens[i : i + 2]) for i in (0, 2, 4))
    assert res["generated_tokens"] == expect_generated
    prompts = [synthetic(1, 8, 4, 512, seed=s).prompts for s in range(3)]
    lat = hf_latency(model, prompts, osl=4, device="cpu", compile=False, warmup=1)
    assert lat["iterations"] == 2 and lat["decode_tok_s"] > 0 and lat["ttft_ms"] > 0


@pytest.mark.skipif(not _engine_importable(), reason="kiln.engine.model_engine is not importable yet")
def test_end_to_end_throughput_and_latency_on_cpu(tmp_path, capsys):
    from kiln.cli import main

    out = tmp_path / "t.json"
    argv = [
        "bench",
        "throughput",
        "--model",
        "preset:tiny-llama",
        "--num-requests",
        "8",
        "--isl",
        "16",
        "--osl",
        "8",
        "--preset-cache",
        str(tmp_path),
        "--json",
        str(out),
        "--append-results",
        str(tmp_path / "R.md"),
    ]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    k = r["results"]["kiln"]
    assert k["output_tokens"] == 64 and k["wrong_lengths"] == 0 and k["num_requests"] == 8
    assert k["output_tok_s"] == pytest.approx(64 / k["elapsed_s"])
    assert k["total_tok_s"] == pytest.approx((64 + 128) / k["elapsed_s"])
    assert 0 < k["ttft_ms"]["p50"] <= k["ttft_ms"]["p99"] and k["tpot_ms"]["p50"] > 0
    assert 1 <= k["peak_batch"] <= 8 and 0 < k["peak_kv_usage"] <= 1
    # 8 prompts of 16 in one prefill step, then 7 decode-only steps (the 8th token comes from the 7th)
    (n_dec, dec_ms), (n_mixed, mixed_ms) = k["step_kinds"]
    assert n_dec + n_mixed == k["steps"] and n_dec >= 6 and n_mixed >= 1 and dec_ms > 0 and mixed_ms > 0
    # one step at a time on the CPU: a mixed step's span (scheduling to results) lies inside its step
    assert 0 < k["mixed_span_ms"] <= mixed_ms
    host_ms, wait_ms, io_ms, gc_ms = k["step_split_ms"]
    assert host_ms > 0 and wait_ms >= 0 and io_ms > 0 and gc_ms >= 0
    assert r["roofline"]["bound"] > 0 and r["workload"]["output_tokens"] == 64
    assert "output tok/s" in capsys.readouterr().out
    assert (tmp_path / "R.md").read_text().count("preset:tiny-llama") == 1
    # kiln bench simulate reads the report and remakes its steps
    capsys.readouterr()
    assert main(["bench", "simulate", "--from-report", str(out)]) == 0
    measured, model = capsys.readouterr().out.splitlines()[1:3]
    assert measured.split()[2:5] == model.split()[1:4]  # steps, decode-only steps, preemptions
    lat = tmp_path / "l.json"
    argv = [
        "bench",
        "latency",
        "--model",
        "preset:tiny-qwen3",
        "--isl",
        "8",
        "--osl",
        "6",
        "--iterations",
        "2",
        "--preset-cache",
        str(tmp_path),
        "--json",
        str(lat),
    ]
    assert main(argv) == 0
    k = json.loads(lat.read_text())["results"]["kiln"]
    assert k["iterations"] == 2 and k["wrong_lengths"] == 0
    assert k["decode_tok_s"] == pytest.approx(1e3 / k["tpot_ms"]) and k["effective_gb_s"] > 0
    assert len(k["step_split_ms"]) == 4
    queued, prefill, rest = k["ttft_split_ms"]  # one prompt of 8: one prefill step, before its first token
    assert queued >= 0 and prefill > 0 and queued + prefill + rest == pytest.approx(k["ttft_ms"])
    to_engine, waiting = k["queued_split_ms"]  # the engine's receipt splits the queued part
    assert to_engine >= 0 and waiting >= 0 and to_engine + waiting == pytest.approx(queued)
    out = capsys.readouterr().out
    assert "of it queued / prefill steps / the rest (ms)" in out
    assert "queued: to the engine / waiting in it" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_preset_draw_and_peaks(tmp_path):
    import time

    from safetensors import safe_open

    from kiln.bench.roofline import measure_peaks

    t0 = time.perf_counter()
    path = materialize_preset("qwen3-0.6b", str(tmp_path), device="cuda")
    secs = time.perf_counter() - t0
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert w.dtype == torch.bfloat16 and w.shape == (1024, 3072)
        assert 0.018 < w.float().std().item() < 0.022
    assert secs < 60, f"drawing a 0.6B preset took {secs:.1f} s"
    peaks = measure_peaks("cuda")
    assert 0.5e12 < peaks.hbm_bytes_per_s < 10e12 and 50e12 < peaks.flops_per_s < 3000e12


@pytest.mark.skipif(not _engine_importable(), reason="kiln.engine.model_engine is not importable yet")
def test_throughput_under_the_max_utilization_policy(tmp_path):
    from kiln.cli import main

    out = tmp_path / "t.json"
    argv = ["bench", "throughput", "--model", "preset:tiny-llama", "--num-requests", "6", "--isl", "12",
            "--osl", "5", "--scheduler-policy", "max_utilization", "--preset-cache", str(tmp_path),
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["scheduler_policy"] == "max_utilization"
    k = r["results"]["kiln"]
    assert k["output_tokens"] == 30 and k["wrong_lengths"] == 0
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--scheduler-policy", "greedy"])


@pytest.mark.parametrize("policy", ["guaranteed_no_evict", "max_utilization"])
def test_simulated_steps_are_the_engines_steps(tiny_model, policy):
    # kiln bench simulate drives the engine's scheduler without a model: on a workload that fills a
    # small KV pool (waiting, chunked prompts, preemptions under max_utilization) it must make the
    # very steps the engine makes.
    from kiln import LLM, SamplingParams
    from kiln.bench.simulate import simulate
    from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig

    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    wl = synthetic(40, 48, 12, 300, isl_stdev=16, osl_stdev=4, seed=3)
    limits = EngineLimits(max_batch_size=8, max_num_tokens=96, max_seq_len=wl.max_seq_len)
    kv = KvCacheConfig(max_tokens=400, tokens_per_block=16)
    with LLM(path, max_batch_size=8, max_num_tokens=96, max_seq_len=wl.max_seq_len, kv_cache_config=kv,
             scheduler_config=SchedulerConfig(policy)) as llm:  # fmt: skip
        before = llm.stats()
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in wl.output_lens]
        llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=False)
        after = llm.stats()
        kv_tokens = (llm.engine_info["num_blocks"] - 1) * kv.tokens_per_block
    sim = simulate(wl, policy, limits, kv_tokens, tokens_per_block=kv.tokens_per_block, overlap=False)
    assert sim.steps == after.steps - before.steps
    assert sim.decode_steps == after.decode_steps - before.decode_steps
    assert sim.preemptions == after.num_preemptions - before.num_preemptions
    assert sim.output_tokens == sum(wl.output_lens)
    if policy == "max_utilization":
        assert sim.preemptions > 0  # the pool is small enough to exercise them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_us_times_calls_inside_one_graph():
    from kiln.bench.graph_timing import graph_replay_us

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    one = graph_replay_us(lambda: torch.mm(a, a), iters=5, calls=1)
    eight = graph_replay_us(lambda: torch.mm(a, a), iters=5, calls=8)
    # a 2048^3 bf16 matmul takes ~20-40 us on an H100: per call, eight in a graph cost about one alone
    assert 0 < one < 1e4 and 0.5 * one < eight < 2 * one
