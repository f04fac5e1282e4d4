"""The demo models shipped inside kiln: small Llama models trained on the Python standard library.

``base`` (~8.9M parameters) is the default model of ``kiln generate`` / ``kiln serve``; ``draft``
(~2.4M parameters, same tokenizer) is a speculative-decoding draft and a quick test model. Both
are plain Hugging Face checkpoints (LlamaForCausalLM, bf16 safetensors, byte-level BPE tokenizer
with a chat template). How they were made: kiln/demo/README.md and tools/train_demo_model.py.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS = ("base", "draft")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_model_path(name: str = "base") -> str:
    """The directory of a shipped demo model, ready for ``LLM(model=...)`` or ``from_pretrained``."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; the shipped demo models are {list(DEMO_MODELS)}")
    path = Path(__file__).resolve().parent / name
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo model {name!r} at {path} lacks {missing}: the package data was not installed; "
            "reinstall kiln, or rebuild the models with tools/train_demo_model.py"
        )
    return str(path)
