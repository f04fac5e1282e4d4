"""The serial roofline bound of a workload: the fastest any engine could run it on a device.

Every engine step runs the whole model once, so a step can be no faster than the larger of
  bytes it must move / HBM bandwidth   (weights + KV read + KV written)
  FLOPs it must do    / matmul peak    (dense layers + attention + LM head of sampling rows)
and the steps run one after another (serially). The bound simulates an ideal in-flight-batching
schedule of the workload (decode tokens first, then prompt chunks into the token budget, at most
``max_batch_size`` sequences) and sums that per-step minimum. It ignores activations, sampling and
host time, so measured / bound <= 1 for a correct measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kiln.bench.checkpoint import head_dim_of, weight_shapes

# Measured on the benchmark H100 80GB SXM: a large device copy and a large BF16 matmul.
H100_HBM_BYTES_PER_S = 3.0e12
H100_BF16_FLOPS = 794e12
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelCost:
    """Per-step costs of one model in one dtype, from its config."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    dense_params: int  # parameters every token multiplies: layers + final norm, no embeddings / LM head
    lm_head_params: int
    embed_params: int
    weight_bytes_per_elem: int
    kv_bytes_per_token: int  # K and V, all layers

    @classmethod
    def from_config(cls, config: dict, dtype: str = "bfloat16", kv_dtype: str | None = None) -> ModelCost:
        if dtype not in _BYTES:
            raise ValueError(f"dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
        shapes = weight_shapes(config)
        sizes = {name: int(np.prod(shape)) for name, shape in shapes}
        embed = sizes["model.embed_tokens.weight"]
        lm_head = sizes.get("lm_head.weight", embed)  # tied: the embedding matrix is the LM head
        dense = sum(sizes.values()) - embed - sizes.get("lm_head.weight", 0)
        nh = int(config["num_attention_heads"])
        nkv = int(config.get("num_key_value_heads") or nh)
        layers = int(config["num_hidden_layers"])
        hd = head_dim_of(config)
        return cls(
            hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]),
            num_layers=layers,
            num_heads=nh,
            head_dim=hd,
            dense_params=dense,
            lm_head_params=lm_head,
            embed_params=embed,
            weight_bytes_per_elem=_BYTES[dtype],
            kv_bytes_per_token=2 * layers * nkv * hd * _BYTES[kv_dtype or dtype],
        )

    @property
    def step_weight_bytes(self) -> int:
        """Weights every step reads: the layers and the LM head (embedding rows are a gather)."""
        return (self.dense_params + self.lm_head_params) * self.weight_bytes_per_elem

    def step_cost(self, ctx_before: np.ndarray, num_new: np.ndarray, num_sampled: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one step. Per scheduled sequence: tokens already in its KV cache and
        tokens computed this step; ``num_sampled`` rows go through the LM head."""
        ctx_before = ctx_before.astype(np.float64)
        num_new = num_new.astype(np.float64)
        tokens = float(num_new.sum())
        kv_read = float((ctx_before + num_new).sum()) * self.kv_bytes_per_token
        kv_written = tokens * self.kv_bytes_per_token
        embed_rows = tokens * self.hidden_size * self.weight_bytes_per_elem
        lm_bytes = self.lm_head_params * self.weight_bytes_per_elem if num_sampled else 0
        nbytes = self.dense_params * self.weight_bytes_per_elem + lm_bytes + kv_read + kv_written + embed_rows
        # Causal attention: new token j (1-based) of a chunk attends ctx_before + j keys; QK^T and PV
        # are 2 FLOPs per multiply-add each, over num_heads * head_dim.
        keys = float((num_new * ctx_before + num_new * (num_new + 1) / 2).sum())
        flops = (
            2.0 * self.dense_params * tokens
            + 2.0 * self.lm_head_params * num_sampled
            + 4.0 * self.num_layers * self.num_heads * self.head_dim * keys
        )
        return nbytes, flops


@dataclass(frozen=True)
class DevicePeaks:
    hbm_bytes_per_s: float
    flops_per_s: float
    source: str  # "configured" | "measured"


@dataclass
class BoundResult:
    seconds: float  # sum over steps of max(memory time, compute time)
    output_tokens: int
    total_tokens: int
    num_steps: int
    memory_bound_steps: int
    decode_steps: int  # steps with no prompt tokens
    decode_seconds: float  # their share of ``seconds``
    mean_decode_step_bytes: float
    mean_decode_batch: float
    hbm_bytes_per_s: float
    flops_per_s: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return self.total_tokens / self.seconds

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["output_tok_s"] = self.output_tok_s
        d["total_tok_s"] = self.total_tok_s
        return d


def serial_bound(
    cost: ModelCost,
    input_lens: list[int],
    output_lens: list[int],
    peaks: DevicePeaks,
    max_batch_size: int = 256,
    max_num_tokens: int = 8192,
) -> BoundResult:
    """Simulate the ideal schedule of requests that all arrive at once; see the module docstring."""
    if len(input_lens) != len(output_lens) or not input_lens:
        raise ValueError("input_lens and output_lens must be non-empty and of equal length")
    if max_batch_size < 1:  # nothing would ever be admitted: the loop below would never end
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_num_tokens < max_batch_size:
        raise ValueError(f"max_num_tokens ({max_num_tokens}) must be >= max_batch_size ({max_batch_size})")
    prompt = np.asarray(input_lens, dtype=np.int64)
    out = np.asarray(output_lens, dtype=np.int64)
    n = len(prompt)
    computed = np.zeros(n, dtype=np.int64)  # prompt tokens in the KV cache
    generated = np.zeros(n, dtype=np.int64)
    decoding: list[int] = []  # generated >= 1 and < out
    prefilling: list[int] = []  # admitted, prompt not finished
    next_waiting = 0
    total = dec_time = dec_bytes = dec_batch = 0.0
    steps = mem_steps = dec_steps = 0
    while decoding or prefilling or next_waiting < n:
        dec = np.asarray(decoding, dtype=np.int64)
        budget = max_num_tokens - len(dec)
        while next_waiting < n and len(decoding) + len(prefilling) < max_batch_size:
            prefilling.append(next_waiting)
            next_waiting += 1
        chunk_seqs, chunk_ctx, chunk_new = [], [], []
        for i in prefilling:
            if budget <= 0:
                break
            c = int(min(prompt[i] - computed[i], budget))
            chunk_seqs.append(i)
            chunk_ctx.append(int(computed[i]))
            chunk_new.append(c)
            budget -= c
        # Decode rows attend their prompt and all but the newest generated token, which they feed.
        ctx = np.concatenate([prompt[dec] + generated[dec] - 1, np.asarray(chunk_ctx, dtype=np.int64)])
        new = np.concatenate([np.ones(len(dec), dtype=np.int64), np.asarray(chunk_new, dtype=np.int64)])
        finishing = [
            i for i, c0, c in zip(chunk_seqs, chunk_ctx, chunk_new, strict=True) if c0 + c == prompt[i]
        ]
        nbytes, flops = cost.step_cost(ctx, new, len(dec) + len(finishing))
        t_mem, t_flop = nbytes / peaks.hbm_bytes_per_s, flops / peaks.flops_per_s
        t = max(t_mem, t_flop)
        total += t
        steps += 1
        mem_steps += t_mem >= t_flop
        if not chunk_seqs:
            dec_steps += 1
            dec_time += t
            dec_bytes += nbytes
            dec_batch += len(dec)
        # Advance the state.
        generated[dec] += 1
        for i, c in zip(chunk_seqs, chunk_new, strict=True):
            computed[i] += c
        for i in finishing:
            generated[i] = 1
            prefilling.remove(i)
            decoding.append(i)
        decoding = [i for i in decoding if generated[i] < out[i]]
    return BoundResult(
        seconds=total,
        output_tokens=int(out.sum()),
        total_tokens=int(out.sum() + prompt.sum()),
        num_steps=steps,
        memory_bound_steps=mem_steps,
        decode_steps=dec_steps,
        decode_seconds=dec_time,
        mean_decode_step_bytes=dec_bytes / max(dec_steps, 1),
        mean_decode_batch=dec_batch / max(dec_steps, 1),
        hbm_bytes_per_s=peaks.hbm_bytes_per_s,
        flops_per_s=peaks.flops_per_s,
    )


def measure_peaks(device: str = "cuda") -> DevicePeaks:
    """Time a 1 GiB device copy (read + write) and an 8192^3 BF16 matmul on ``device``."""
    import torch

    dev = torch.device(device)
    n = 1 << 29  # bf16 elements: 1 GiB
    buf = {"x": torch.empty(n, dtype=torch.bfloat16, device=dev)}
    buf["y"] = torch.empty_like(buf["x"])
    buf["a"] = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    buf["b"] = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)

    def timed(fn, iters: int) -> float:
        fn()
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 1e3 / iters

    t_copy = timed(lambda: buf["y"].copy_(buf["x"]), 20)
    t_mm = timed(lambda: torch.mm(buf["a"], buf["b"]), 20)
    buf.clear()  # release the buffers before an engine sizes its KV pool
    torch.cuda.empty_cache()
    return DevicePeaks(2 * n * 2 / t_copy, 2 * 8192**3 / t_mm, "measured")


def device_peaks(mode: str, card: str, hbm: float | None = None, flops: float | None = None) -> DevicePeaks:
    """``mode``: "configured" (the H100 figures, or ``hbm`` / ``flops`` when given), "measured" (time
    the device) or "auto" (configured on an H100 SXM or without a GPU, measured on any other card)."""
    if mode not in ("auto", "configured", "measured"):
        raise ValueError(f"roofline mode must be 'auto', 'configured' or 'measured', got {mode!r}")
    if hbm is not None or flops is not None:
        mode = "configured"
    if mode == "auto":
        mode = "configured" if ("H100" in card and "HBM3" in card) or card == "cpu" else "measured"
    if mode == "measured":
        return measure_peaks()
    return DevicePeaks(hbm or H100_HBM_BYTES_PER_S, flops or H100_BF16_FLOPS, "configured")
