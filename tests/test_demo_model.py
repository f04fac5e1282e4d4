"""The shipped demo models (kiln/demo): layout, tokenizer, held-out perplexity, kiln == transformers."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

import kiln.demo
from kiln.demo import DEMO_MODELS, demo_model_path

SAMPLE = Path(__file__).parent / "data" / "demo_heldout_sample.txt"
METRICS = Path(kiln.demo.__file__).parent / "metrics.json"
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def push(self, item):\n"]
MAX_DIR_BYTES = 20_000_000


@functools.cache
def _load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@functools.cache
def _sample_perplexity(name: str) -> float:
    """exp(mean next-token loss) of the held-out sample, over non-overlapping windows of the context."""
    model, tok = _load(name)
    ids = tok(SAMPLE.read_text())["input_ids"]
    ctx = model.config.max_position_embeddings
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, ctx):
            w = torch.tensor(ids[s : s + ctx + 1])[None]  # [1, <= ctx + 1]
            logits = model(input_ids=w[:, :-1], use_cache=False).logits[0]  # [len, V]
            total += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return math.exp(total / count)


def test_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="base"):
        demo_model_path("large")


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_hf_layout_and_size(name: str) -> None:
    from safetensors import safe_open

    path = Path(demo_model_path(name))
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (path / f).is_file(), f
    assert (path / "tokenizer_config.json").is_file()
    assert sum(p.stat().st_size for p in path.iterdir()) <= MAX_DIR_BYTES
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_tokenizer_is_shared_and_round_trips() -> None:
    base, draft = (Path(demo_model_path(n)) for n in DEMO_MODELS)
    assert (base / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    _, tok = _load("base")
    text = SAMPLE.read_text()[:2000]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.eos_token_id  # a prompt starts like a training document
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(text.encode()) / len(ids) > 2.5  # BPE merges, not bytes


def test_chat_template_renders_turns_and_an_assistant_prompt() -> None:
    _, tok = _load("base")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum a list."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nSum a list.<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")]
    assert all(s in ids for s in specials) and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_heldout_perplexity_within_recorded_bound(name: str) -> None:
    recorded = json.loads(METRICS.read_text())
    ppl = _sample_perplexity(name)
    # The bound was measured from these files at export; fp32 on any CPU reproduces it to ~1e-6.
    assert ppl == pytest.approx(recorded[name]["sample_ppl"], rel=2e-3)
    assert ppl < 0.01 * _load(name)[0].config.vocab_size  # uniform guessing would be vocab_size


def test_base_beats_draft_on_heldout_text() -> None:
    assert _sample_perplexity("base") < _sample_perplexity("draft")


def test_base_writes_python_like_text() -> None:
    model, tok = _load("base")
    enc = tok('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "\n    return " in text and "def " in text


def _hf_greedy(name: str, prompt: str, max_tokens: int) -> list[int]:
    model, tok = _load(name)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_kiln_greedy_matches_transformers(name: str) -> None:
    try:
        from kiln import LLM, SamplingParams
        from kiln.llm import LLM as _  # noqa: F401 - the engine may not be importable yet
    except ImportError as e:
        pytest.skip(f"kiln.llm is not importable: {e}")
    llm = LLM(model=demo_model_path(name), dtype="float32", device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(name, prompt, 16), prompt
