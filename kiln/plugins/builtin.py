"""Importing this module registers every built-in plugin."""

from kiln.plugins import activation, attention, linear, norms, rope_kv_write, sdpa_prefill  # noqa: F401
