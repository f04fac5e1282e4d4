"""Stages of tools/train_demo_model.py: corpus, tokenizer, presets, training loop, evaluation."""
