"""Greedy sampling in two launches: the argmax token of each logits row and its log-probability.

The general sampler spends about a dozen launches on a greedy step (cast to fp32, the five kernels of
logsumexp, argmax, gather, packing), and a one-row reduction over a 128k vocabulary runs on a single
SM. Here each row's vocabulary is cut into chunks spread over the whole GPU; every program keeps, per
lane, an online (max, first index of the max, sum of exp) and writes one partial; a second launch
merges a row's partials and writes the token (int64, for the next step's input) and the packed int32
words [token | logprob bits] that the step copies to the host.

Ties go to the lowest index and the logprob is -log(sum(exp(x - max))), as torch's argmax and
log_softmax give them; ``kiln.engine.sampling_math.greedy_sample_reference`` is the plain-torch version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.triton._common import next_pow2, num_sms, pdl_args, pdl_trigger, pdl_wait

_BLOCK = 1024  # vocabulary entries a program loads per iteration
# Programs per SM to aim for. A program streams its chunk one block at a time, so the loads in flight
# grow with the programs: at 2 a SM (one chunk a row past 264 rows) a 512-row step of Llama-3's
# vocabulary read its logits at 0.6 TB/s (438 us on an H100, scripts/profile_step.py).
_PROGRAMS_PER_SM = 8


# the batch size changes every step: no int argument derived from it is specialised (no mid-run compiles)
@triton.jit(do_not_specialize=["chunk", "num_chunks"])
def _greedy_partial_kernel(
    logits_ptr, stride_row, vocab, chunk, part_max_ptr, part_sum_ptr, part_idx_ptr, num_chunks,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    start = c * chunk
    end = tl.minimum(start + chunk, vocab)
    base = logits_ptr + row * stride_row
    for v0 in range(start, end, BLOCK):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with nothing yet stay at sum 0
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        idx = tl.where(x > m, cols, idx)  # strict: a lane keeps its first maximum
        m = m_new
    row_max = tl.max(m, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(s * tl.exp(m - shift), axis=0)
    row_idx = tl.min(tl.where(m == row_max, idx, vocab), axis=0)
    out = row * num_chunks + c
    tl.store(part_max_ptr + out, row_max)
    tl.store(part_sum_ptr + out, row_sum)
    tl.store(part_idx_ptr + out, row_idx)


@triton.jit(do_not_specialize=["num_chunks", "num_rows"])
def _greedy_merge_kernel(
    part_max_ptr, part_sum_ptr, part_idx_ptr, num_chunks, vocab, tokens_ptr, packed_ptr, num_rows,
    BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < num_chunks
    m = tl.load(part_max_ptr + row * num_chunks + offs, mask=ok, other=float("-inf"))
    s = tl.load(part_sum_ptr + row * num_chunks + offs, mask=ok, other=0.0)
    idx = tl.load(part_idx_ptr + row * num_chunks + offs, mask=ok, other=vocab)
    row_max = tl.max(m, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(tl.where(ok, s * tl.exp(m - shift), 0.0), axis=0)
    token = tl.min(tl.where(ok & (m == row_max), idx, vocab), axis=0)
    token = tl.where(token >= vocab, 0, token)  # a row of -inf only: index 0, like argmax
    logprob = -tl.log(total)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(packed_ptr + row, token)
    tl.store(packed_ptr + num_rows + row, logprob.to(tl.int32, bitcast=True))


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (fp32, fp16 or bf16, last dim contiguous) -> (tokens [R] int64,
    packed [2R] int32 = [tokens | float32 bits of log_softmax at the token])."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"greedy_sample needs logits [R, V] contiguous in V, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    packed = torch.empty(2 * rows, dtype=torch.int32, device=dev)
    if rows == 0:
        return tokens, packed
    # enough chunks that small batches still cover the GPU; no chunk shorter than one block
    max_chunks = triton.cdiv(vocab, _BLOCK)
    num_chunks = max(1, min(max_chunks, triton.cdiv(_PROGRAMS_PER_SM * num_sms(dev), rows)))
    chunk = triton.cdiv(triton.cdiv(vocab, num_chunks), _BLOCK) * _BLOCK
    num_chunks = triton.cdiv(vocab, chunk)
    part_max = torch.empty(rows, num_chunks, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=dev)
    _greedy_partial_kernel[(rows, num_chunks)](
        logits, logits.stride(0), vocab, chunk, part_max, part_sum, part_idx, num_chunks,
        BLOCK=_BLOCK, num_warps=4, **pdl_args(dev),
    )  # fmt: skip
    _greedy_merge_kernel[(rows,)](
        part_max, part_sum, part_idx, num_chunks, vocab, tokens, packed, rows,
        # sized for the vocabulary, not the batch: a constexpr that followed the row count would
        # compile a new variant mid-run whenever a step's row count crossed a power of two
        BLOCK_C=next_pow2(max_chunks), num_warps=1, **pdl_args(dev),
    )  # fmt: skip
    return tokens, packed
