"""kiln: an LLM inference engine. Build once, then serve with in-flight batching over a paged KV cache."""

from kiln.config import KvCacheConfig, SchedulerConfig
from kiln.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "KvCacheConfig",
    "SchedulerConfig",
    "RequestOutput",
    "CompletionOutput",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import kiln` stays light (no torch) until the engine is used
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from kiln import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
