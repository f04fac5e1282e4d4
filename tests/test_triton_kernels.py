"""The Triton kernels of the built-in plugins against their plain-torch references.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (fp32 and fp16 only);
with CUDA the same tests run compiled kernels, and the ``gpu`` tests add bf16, long contexts,
large shapes, CUDA-graph replay and torch.compile.
"""

from __future__ import annotations

import inspect

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton_env import ON_GPU, skip_module_without_triton  # first: picks the interpreter

skip_module_without_triton()

from kiln.engine.sampling_math import greedy_sample_reference  # noqa: E402
from kiln.plugins import get_plugin  # noqa: E402
from kiln.plugins.triton import attention_plan  # noqa: E402
from kiln.plugins.triton.activation import silu_and_mul  # noqa: E402
from kiln.plugins.triton.attention_plan import plan_passes  # noqa: E402
from kiln.plugins.triton.gemv import add_rms_norm_gemv, gemv, silu_mul_gemv  # noqa: E402
from kiln.plugins.triton.greedy_sample import greedy_sample  # noqa: E402
from kiln.plugins.triton.norms import fused_add_rms_norm, rms_norm  # noqa: E402
from kiln.plugins.triton.paged_attention import paged_attention  # noqa: E402
from kiln.plugins.triton.rope_kv_write import rope_kv_write  # noqa: E402
from kiln.plugins.triton.skinny_gemm import (  # noqa: E402
    add_rms_norm_skinny_gemm,
    silu_mul_skinny_gemm,
    skinny_gemm,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# the interpreter converts 1-element arrays to ints in loop bounds; numpy 2.3 warns about it each time
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (compiled Triton kernels)")

# Tolerances against the fp32-accumulating references; bf16/fp16 allow for rounding p to the
# input dtype before P @ V (and one output ulp); fp32 must be exact up to summation order.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _poison_allocator(nbytes: int, count: int = 3) -> None:
    """Leave NaN-filled blocks of ``nbytes`` in the allocator so kernel outputs reuse them:
    an element the kernel fails to write then shows up as NaN instead of a lucky leftover."""
    blocks = [torch.full((max(nbytes // 4, 1),), float("nan"), device=DEVICE) for _ in range(count)]
    del blocks


def _ref(name: str):
    return get_plugin(name).plugin.reference


def _assert_rounds_like(out: torch.Tensor, ref: torch.Tensor, min_exact: float = 0.99) -> None:
    """Close, and bit-equal almost everywhere: a kernel that rounds in another order than the
    reference (e.g. keeps an fp32 intermediate the reference rounds) misses on ~20% of elements,
    which a tolerance alone would hide. The few allowed misses come from fp32 summation order and
    approximate exp/rsqrt flipping a rounding. fp32 results only need to be close."""
    torch.testing.assert_close(out, ref, **TOL[out.dtype])
    if out.dtype == torch.float32:
        return
    exact = (out == ref).float().mean().item()
    assert exact >= min_exact, f"only {exact:.1%} of elements round like the reference"


# ----------------------------------------------------------------------------- norms, activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (2, 10000)])  # 10000 > one tile: two sweeps
def test_rms_norm(dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    _poison_allocator(x.numel() * x.element_size())
    out = rms_norm(x, w, 1e-6)
    _assert_rounds_like(out, _ref("rms_norm")(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (2, 10000)])
def test_fused_add_rms_norm(dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    res = torch.randn(shape, dtype=dtype, device=DEVICE) * 4
    w = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    _poison_allocator(x.numel() * x.element_size())
    out, res_out = fused_add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = _ref("fused_add_rms_norm")(x, res, w, 1e-5)
    assert torch.equal(res_out, ref_res)  # one rounded add, as torch does it
    _assert_rounds_like(out, ref_out)


def test_rms_norm_rejects_mismatched_weight():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x.half(), torch.ones(64, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 200), (3, 2 * 1500)])  # 1500 > one column block
def test_silu_and_mul(dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    _poison_allocator(x.numel() * x.element_size() // 2)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    _assert_rounds_like(out, _ref("silu_and_mul")(x))


# ----------------------------------------------------------------------------- greedy sampling


def _check_greedy(logits: torch.Tensor) -> None:
    tokens, packed = greedy_sample(logits)
    ref_tokens, ref_packed = greedy_sample_reference(logits)
    r = logits.shape[0]
    assert tokens.dtype == torch.int64 and packed.dtype == torch.int32 and packed.shape == (2 * r,)
    assert tokens.tolist() == ref_tokens.tolist()
    assert packed[:r].tolist() == ref_packed[:r].tolist()
    torch.testing.assert_close(packed[r:].view(torch.float32), ref_packed[r:].view(torch.float32),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 1000), (20, 2500), (2, 7)])
def test_greedy_sample(dtype, rows, vocab):
    _check_greedy((torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype))


def test_greedy_sample_ties_and_masked_rows():
    logits = torch.full((4, 3000), -5.0, device=DEVICE)
    logits[0, [7, 2100, 2999]] = 3.0  # a tie across chunks: the lowest index wins, as in argmax
    logits[1, -1] = 1.0  # the maximum in the last, partial block
    logits[2, :1500] = float("-inf")  # half of the row masked out
    logits[3, 0] = 9.0
    _check_greedy(logits)
    assert greedy_sample(logits)[0].tolist() == [7, 2999, 1500, 0]


# ----------------------------------------------------------------------------- skinny GEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m,n,k,splits", [(1, 96, 200, None), (3, 70, 1100, None), (8, 33, 64, 1), (5, 130, 700, 3)]
)
def test_skinny_gemm(dtype, m, n, k, splits):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    out = skinny_gemm(x, w, num_splits=splits)
    ref = (x.float() @ w.float().T).to(dtype)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("block_n,block_k,splits", [(32, 64, 1), (64, 128, 2), (16, 32, 4)])
def test_skinny_gemm_tile_overrides(block_n, block_k, splits):
    # every column-tile width the plan picks, ragged N and K, with and without split K
    x = torch.randn(2, 300, device=DEVICE).to(torch.float16)
    w = (torch.randn(100, 300, device=DEVICE) / 300**0.5).to(torch.float16)
    out = skinny_gemm(x, w, block_n=block_n, block_k=block_k, num_splits=splits)
    torch.testing.assert_close(out, (x.float() @ w.float().T).to(torch.float16), **TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,splits", [(1, 40, 300, None), (3, 70, 260, 2), (8, 17, 128, 1)])
def test_skinny_gemm_prologues_match_the_unfused_ops(dtype, m, n, k, splits):
    # fused_add_rms_norm or silu_and_mul, then the product: the prologue repeats each op's roundings
    x, residual = (torch.randn(m, k, device=DEVICE).to(dtype) for _ in range(2))
    norm_w = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    normed, res_ref = _ref("fused_add_rms_norm")(x, residual, norm_w, 1e-5)
    out, res_out = add_rms_norm_skinny_gemm(x, residual, norm_w, 1e-5, w, num_splits=splits)
    assert torch.equal(res_out, res_ref)
    torch.testing.assert_close(out, (normed.float() @ w.float().T).to(dtype), **TOL[dtype])
    gate_up = torch.randn(m, 2 * k, device=DEVICE).to(dtype)
    act = _ref("silu_and_mul")(gate_up)
    out = silu_mul_skinny_gemm(gate_up, w, num_splits=splits)
    torch.testing.assert_close(out, (act.float() @ w.float().T).to(dtype), **TOL[dtype])


def test_skinny_gemm_prologues_reject_mismatched_inputs():
    x, w = torch.randn(2, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="residual shaped and strided like x"):
        add_rms_norm_skinny_gemm(x, torch.randn(2, 8, device=DEVICE), torch.ones(16, device=DEVICE), 1e-5, w)
    with pytest.raises(ValueError, match=r"gate_up \[M, 2K\]"):
        silu_mul_skinny_gemm(x, w)


def test_skinny_gemm_plan_fills_the_gpu_before_splitting_k():
    from kiln.plugins.triton.skinny_gemm import plan

    assert plan(28672, 4096, 132) == (64, 1)  # 8B gate|up: 448 tiles of 64 columns
    assert plan(16384, 2048, 132) == (32, 1)  # 1B gate|up: 512 tiles of 32
    assert plan(6144, 4096, 132) == (16, 1)  # 8B q|k|v: 384 tiles of 16, more than a wave
    assert plan(2048, 8192, 132) == (16, 3)  # 1B down: 128 tiles, under a wave: K in three
    assert plan(2048, 512, 132) == (16, 1)  # K too short to split


def test_skinny_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1 to 8 rows"):
        skinny_gemm(torch.randn(9, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
        skinny_gemm(torch.randn(2, 16, device=DEVICE), torch.randn(4, 8, device=DEVICE))


# ----------------------------------------------------------------------------- GEMV (one row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,tiles", [(96, 200, {}), (70, 1100, {}), (33, 64, dict(block_n=8, block_k=32)),
                                       (130, 700, dict(block_n=16, block_k=128, num_warps=2))])  # fmt: skip
def test_gemv(dtype, n, k, tiles):
    # ragged N and K (masked K tiles, the last column tile clamped), planned and overridden tiles
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    out = gemv(x, w, **tiles)
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out, (x.float() @ w.float().T).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,tiles", [(40, 300, {}), (17, 128, dict(block_n=4, block_k=64))])
def test_gemv_prologues_match_the_unfused_ops(dtype, n, k, tiles):
    # fused_add_rms_norm or silu_and_mul, then the product; the norm is applied to the finished dot
    # products in fp32 (not rounded between), so fp16 agrees to the dtype's tolerance
    x, residual = (torch.randn(1, k, device=DEVICE).to(dtype) for _ in range(2))
    norm_w = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    normed, res_ref = _ref("fused_add_rms_norm")(x, residual, norm_w, 1e-5)
    out, res_out = add_rms_norm_gemv(x, residual, norm_w, 1e-5, w, **tiles)
    assert torch.equal(res_out, res_ref)
    torch.testing.assert_close(out, (normed.float() @ w.float().T).to(dtype), **TOL[dtype])
    gate_up = torch.randn(1, 2 * k, device=DEVICE).to(dtype)
    out = silu_mul_gemv(gate_up, w, **tiles)
    act = _ref("silu_and_mul")(gate_up)
    torch.testing.assert_close(out, (act.float() @ w.float().T).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("k,prefetch", [(300, 0), (1024, 0), (1500, 0), (1500, 512), (1024, 1024),
                                        (300, 4096)])  # fmt: skip
def test_gemv_with_pdl_peels_its_first_weight_tiles(monkeypatch, k, prefetch):
    # PDL's path: the first K tile (or the first ``prefetch`` elements: several tiles, all of K, or more
    # than K) before the wait, the rest in the loop (the squares for the norm and the new residual
    # carried across). On the CPU the grid-dependency instructions are stubbed (the interpreter has none);
    # on a GPU they run, harmless without the launch attribute.
    from kiln.plugins.triton import _common
    from kiln.plugins.triton import gemv as gemv_module

    waits: list[int] = []
    if not ON_GPU:
        monkeypatch.setattr(_common, "gdc_wait", lambda: waits.append(1))
        monkeypatch.setattr(_common, "gdc_launch_dependents", lambda: None)
    monkeypatch.setattr(gemv_module, "pdl_args", lambda device: {"PDL": True})
    dtype = torch.float32
    x, residual = (torch.randn(1, k, device=DEVICE) for _ in range(2))
    norm_w = 1 + 0.1 * torch.randn(k, device=DEVICE)
    w = torch.randn(37, k, device=DEVICE) / k**0.5
    tiles = dict(block_k=256, prefetch_k=prefetch)
    torch.testing.assert_close(gemv(x, w, **tiles), x @ w.T, **TOL[dtype])
    normed, res_ref = _ref("fused_add_rms_norm")(x, residual, norm_w, 1e-5)
    out, res_out = add_rms_norm_gemv(x, residual, norm_w, 1e-5, w, **tiles)
    assert torch.equal(res_out, res_ref)
    torch.testing.assert_close(out, normed @ w.T, **TOL[dtype])
    gate_up = torch.randn(1, 2 * k, device=DEVICE)
    torch.testing.assert_close(silu_mul_gemv(gate_up, w, **tiles), _ref("silu_and_mul")(gate_up) @ w.T,
                               **TOL[dtype])  # fmt: skip
    assert ON_GPU or len(waits) == 3 * 37  # every program of the three launches waited once


def test_gemv_prefetch_is_whole_tiles_within_k():
    from kiln.plugins.triton.gemv import prefetch_block

    assert prefetch_block(0, 512, 4096) == 512  # 0: one tile
    assert prefetch_block(None, 512, 4096) == 2048  # the default: half of K ...
    assert prefetch_block(None, 512, 2048) == 1024
    assert prefetch_block(None, 512, 14336) == 2048  # ... at most 2,048
    assert prefetch_block(None, 512, 600) == 512  # ... at least one tile
    assert prefetch_block(2048, 512, 4096) == 2048
    assert prefetch_block(8192, 512, 2048) == 2048  # no more than K
    assert prefetch_block(8192, 512, 1500) == 2048  # K rounded up to a power of two (masked)
    assert prefetch_block(256, 512, 4096) == 512  # at least one tile
    with pytest.raises(ValueError, match="power of two"):
        prefetch_block(3000, 512, 4096)


def test_tuning_overrides_from_the_environment(monkeypatch):
    # end-to-end tuning knobs: colon-separated ints read at launch, 0 = the planner's choice
    from kiln.plugins.triton import gemv as gemv_module
    from kiln.plugins.triton import paged_attention as pa
    from kiln.plugins.triton._common import env_ints

    monkeypatch.delenv("KILN_TEST_PLAN", raising=False)
    assert env_ints("KILN_TEST_PLAN", 2) is None
    monkeypatch.setenv("KILN_TEST_PLAN", "64:0")
    assert env_ints("KILN_TEST_PLAN", 2) == (64, 0)
    for bad in ("64", "64:x", "64:-1", "64,0"):
        monkeypatch.setenv("KILN_TEST_PLAN", bad)
        with pytest.raises(ValueError, match="KILN_TEST_PLAN must be 2 colon-separated non-negative"):
            env_ints("KILN_TEST_PLAN", 2)
    launches: list[dict] = []
    real = gemv_module._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append(meta)
                return real[grid](*args, **meta)

            return launch

    monkeypatch.setattr(gemv_module, "_gemv_kernel", Spy())
    monkeypatch.setenv(gemv_module.PLAN_ENV, "4:128:0")
    x, w = torch.randn(1, 300, device=DEVICE), torch.randn(37, 300, device=DEVICE) / 300**0.5
    torch.testing.assert_close(gemv(x, w), x @ w.T, **TOL[torch.float32])
    assert (launches[-1]["BLOCK_N"], launches[-1]["BLOCK_K"], launches[-1]["num_warps"]) == (4, 128, 4)
    monkeypatch.setenv(pa.DECODE_PLAN_ENV, "32:0:3:2")
    _check_attention(DECODE, 4, 2, 64, 16, torch.float32)  # a decode step under the override: still right
    monkeypatch.setenv(pa.DECODE_PLAN_ENV, "32:0:3")
    with pytest.raises(ValueError, match="KILN_ATTENTION_DECODE_PLAN must be 4"):
        _check_attention(DECODE, 4, 2, 64, 16, torch.float32)
    _check_attention(MIXED, 4, 2, 64, 16, torch.float32)  # not a decode step: the override is not read


def test_gemv_prefetch_comes_from_the_environment_at_each_launch(monkeypatch):
    from kiln.plugins.triton.gemv import PREFETCH_ENV, prefetch_from_env

    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert prefetch_from_env() is None  # the default
    monkeypatch.setenv(PREFETCH_ENV, "0")
    assert prefetch_from_env() == 0
    monkeypatch.setenv(PREFETCH_ENV, "4096")
    assert prefetch_from_env() == 4096
    monkeypatch.setenv(PREFETCH_ENV, "lots")
    with pytest.raises(ValueError, match=r"KILN_GEMV_PREFETCH_K must be 0 \(one K tile\) or a power of two"):
        prefetch_from_env()


def test_gemv_plan_groups_columns_only_for_a_prologue():
    from kiln.plugins.triton.gemv import _ADD_RMS_NORM, _SILU_MUL, plan

    assert plan(28672, 4096, 132) == (1, 512, 4)  # plain: one column a program
    assert plan(100, 200, 132) == (1, 256, 4)  # K in one tile
    assert plan(28672, 4096, 132, _ADD_RMS_NORM) == (8, 1024, 4)  # 8B gate|up: 3,584 programs
    assert plan(2048, 8192, 132, _SILU_MUL) == (2, 1024, 4)  # 1B down: 1,024 programs of two rows
    assert plan(100, 200, 132, _SILU_MUL) == (1, 256, 4)  # too few columns to group


def test_gemv_rejects_bad_inputs():
    w = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[1, K\] and w \[N, K\]"):
        gemv(torch.randn(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="one dtype"):
        gemv(torch.randn(1, 16, device=DEVICE).half(), w)
    with pytest.raises(ValueError, match="residual shaped like x"):
        add_rms_norm_gemv(torch.randn(1, 16, device=DEVICE), torch.randn(1, 8, device=DEVICE),
                          torch.ones(16, device=DEVICE), 1e-5, w)  # fmt: skip
    with pytest.raises(ValueError, match=r"gate_up \[1, 2K\]"):
        silu_mul_gemv(torch.randn(1, 16, device=DEVICE), w)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (128256, 2048)])
def test_gpu_gemv_bf16_at_model_shapes(n, k):
    x = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(torch.bfloat16)
    ref = (x.float() @ w.float().T).to(torch.bfloat16)
    torch.testing.assert_close(gemv(x, w), ref, **TOL[torch.bfloat16])
    residual, norm_w = torch.randn_like(x), torch.ones(k, device=DEVICE, dtype=torch.bfloat16)
    normed, _ = _ref("fused_add_rms_norm")(x, residual, norm_w, 1e-5)
    out, _ = add_rms_norm_gemv(x, residual, norm_w, 1e-5, w)
    torch.testing.assert_close(out, (normed.float() @ w.float().T).to(torch.bfloat16), atol=3e-2, rtol=3e-2)
    gate_up = torch.randn(1, 2 * k, device=DEVICE).to(torch.bfloat16)
    act = _ref("silu_and_mul")(gate_up)
    ref = (act.float() @ w.float().T).to(torch.bfloat16)
    torch.testing.assert_close(silu_mul_gemv(gate_up, w), ref, **TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- rope + kv write


def _cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [max_pos, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)  # [max_pos, D]


def _check_rope_kv_write(num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    num_blocks = -(-2 * num_tokens // block_size)
    q = torch.randn(num_tokens, num_q_heads, head_dim, dtype=dtype, device=DEVICE)
    # k and v as strided views of one fused qkv-like buffer, as a model's projection produces them
    kv = torch.randn(num_tokens, 2 * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    positions = torch.randint(0, 500, (num_tokens,), device=DEVICE)
    cache = _cos_sin_cache(512, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::3] = -1  # padded / already cached tokens: never written
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                         device=DEVICE) for _ in range(4)]  # fmt: skip
    _poison_allocator(q.numel() * q.element_size())
    q_rot = rope_kv_write(q, k, v, positions, cache, caches[0], caches[1], slots)
    ref_q = _ref("rope_kv_write")(q, k, v, positions, cache, caches[2], caches[3], slots)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    exact = dtype != torch.float32  # fp32 may contract a*b - c*d into an fma on the GPU
    tol = dict(atol=0, rtol=0) if exact else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q_rot, ref_q, **tol)
    for mine, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        flat, flat_ref = mine.view(-1, num_kv_heads, head_dim), ref.view(-1, num_kv_heads, head_dim)
        torch.testing.assert_close(flat[written], flat_ref[written], **tol)
        assert flat[~written].isnan().all(), "a slot that slot_mapping skips was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [(4, 4, 64, 16), (8, 4, 128, 32), (8, 2, 64, 32), (12, 3, 128, 16), (4, 2, 96, 16)],
)
def test_rope_kv_write(dtype, num_q_heads, num_kv_heads, head_dim, block_size):
    _check_rope_kv_write(11, num_q_heads, num_kv_heads, head_dim, block_size, dtype)


# ----------------------------------------------------------------------------- decode graph inputs


@pytest.mark.gpu  # and on the CPU through Triton's interpreter
@pytest.mark.parametrize("max_blocks,tpb", [(7, 16), (5000, 32)])
def test_decode_inputs_kernel_matches_the_torch_ops(max_blocks, tpb):
    # one kernel for a decode graph's input tokens, block-table rows, KV write slots and int32 lengths;
    # rows of every kind: a known token, one sampled by the previous step, padding (no slot); and a
    # table wider than one copy tile (5,000 entries: two loop steps)
    from kiln.engine.decode_inputs import _decode_inputs_triton, decode_inputs_reference

    g = torch.Generator().manual_seed(3)
    num_slots = 6
    block_table = torch.randint(1, 10_000, (num_slots, max_blocks), generator=g, dtype=torch.int32)
    prev_tokens = torch.randint(0, 50_000, (9,), generator=g)
    #        input id  position                  slot  seq len                 prev row
    rows = [(17, 3, 2, 4, -1), (-1, 2 * tpb + 1, 0, 2 * tpb + 2, 5), (0, 0, -1, 1, -1),
            (99, tpb * max_blocks - 1, 5, tpb * max_blocks, -1), (-1, 0, 4, 1, 8)]  # fmt: skip
    inputs = torch.full((5, 16), -7, dtype=torch.int64)  # padded like the graph runner's buffer
    inputs[:, : len(rows)] = torch.tensor(rows, dtype=torch.int64).T
    view = inputs[:, : len(rows)].to(DEVICE)
    got = _decode_inputs_triton(view, prev_tokens.to(DEVICE), block_table.to(DEVICE), tpb)
    want = decode_inputs_reference(view, prev_tokens.to(DEVICE), block_table.to(DEVICE), tpb)
    for name, a, b in zip(("input_ids", "slot_mapping", "block_tables", "seq_lens"), got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), name
    ids, slot_mapping, tables, _ = (t.cpu() for t in got)
    assert ids.tolist()[:3] == [17, int(prev_tokens[5]), 0] and slot_mapping[2] == -1
    assert int(tables[2].abs().sum()) == 0  # padding reads the null block
    with pytest.raises(ValueError, match=r"rows must be \[5, b\] int64"):
        _decode_inputs_triton(view.int(), prev_tokens.to(DEVICE), block_table.to(DEVICE), tpb)


# ----------------------------------------------------------------------------- paged attention


def _paged_batch(
    seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, extra_tokens=0, in_order=False
):
    """seqs: [(q_len, kv_len)] in packed order. Builds shuffled block tables (``in_order``: the ids
    1, 2, ... in packed order) over a NaN-filled cache (only the first kv_len positions of each
    sequence hold data, so any read past them, or of another sequence's blocks, poisons the result)
    and returns the attention arguments."""
    need = [-(-kv // block_size) for _, kv in seqs]
    num_blocks = sum(need) + 2
    perm = torch.arange(1, num_blocks + 1) if in_order else torch.randperm(num_blocks)
    perm = perm.to(device=DEVICE, dtype=torch.int32)
    num_blocks += in_order  # the last id in order
    # unused table entries point far out of the cache: a kernel that reads them faults or fails
    tables = torch.full((len(seqs), max(need) + 2), 1 << 30, dtype=torch.int32, device=DEVICE)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                         device=DEVICE)  # fmt: skip
    v_cache = k_cache.clone()
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    used = 0
    for s, (_, kv_len) in enumerate(seqs):
        tables[s, : need[s]] = perm[used : used + need[s]]
        used += need[s]
        pos = torch.arange(kv_len, device=DEVICE)
        slots = tables[s, pos // block_size].long() * block_size + pos % block_size
        flat_k[slots] = torch.randn(kv_len, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        flat_v[slots] = torch.randn(kv_len, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    q_lens = [q for q, _ in seqs]
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens + extra_tokens, num_q_heads, head_dim, device=DEVICE).to(dtype)
    query_start_loc = torch.tensor([0, *q_lens], device=DEVICE).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=DEVICE)
    return (q, k_cache, v_cache, tables, seq_lens, query_start_loc, max(q_lens), max(kv for _, kv in seqs),
            head_dim**-0.5)  # fmt: skip


def _check_attention(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, window=0, **overrides):
    args = _paged_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype)
    q = args[0]
    _poison_allocator(q.numel() * q.element_size())
    out = paged_attention(*args, window, **overrides)
    ref = _ref("paged_attention")(*args, window)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    return args


# decode rows first, then context chunks whose cached prefixes cross block boundaries; one sequence
# has no new tokens this step
MIXED = [(1, 17), (1, 33), (1, 5), (0, 9), (12, 40), (20, 20), (7, 70)]
DECODE = [(1, 150), (1, 7), (1, 64), (1, 97)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "head_dim,group,block_size",
    [(64, 1, 16), (64, 2, 32), (64, 4, 16), (128, 1, 32), (128, 2, 16), (128, 4, 32)],
)
def test_attention_mixed_batch(dtype, head_dim, group, block_size):
    _check_attention(MIXED, 2 * group, 2, head_dim, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("seqs", [DECODE, MIXED], ids=["decode", "mixed"])
def test_attention_split_kv(dtype, num_splits, seqs):
    # 5 splits of a short sequence leave some splits without keys: the merge must ignore them
    _check_attention(seqs, 4, 2, 64, 16, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,num_splits", [(8, 1), (33, 1), (8, 3), (1, 1)])
def test_attention_sliding_window(dtype, window, num_splits):
    _check_attention(MIXED, 4, 2, 64, 16, dtype, window=window, num_splits=num_splits, block_m=16)


@pytest.mark.parametrize("group", [1, 3])
def test_attention_tile_search(group):
    # small tiles: chunks span several query tiles and the tile -> sequence map is searched
    passes = plan_passes(sum(q for q, _ in MIXED), len(MIXED), 2, group, 64, torch.float32, 20, 70, DEVICE,
                         block_m=16)  # fmt: skip
    assert len(passes) == 2 and passes[1].use_search and passes[1].tokens_per_tile == 16 // group
    _check_attention(MIXED, 2 * group, 2, 64, 16, torch.float32, block_m=16)


def test_attention_two_passes_split_differently(monkeypatch):
    # few decode rows split their long histories; the many-tile chunk pass does not. One merge
    # launch must merge only the decode pass's tokens and leave the chunk's output alone.
    monkeypatch.setattr(attention_plan, "num_sms", lambda device: 8)
    # group 2: the decode pass takes sequences of up to 8 new tokens; 8 and 9 sit on the boundary
    seqs = [(1, 300), (8, 290), (9, 100), (100, 400)]
    passes = plan_passes(118, 4, 1, 2, 64, torch.float32, 100, 400, DEVICE, block_m=16)
    assert [p.num_splits > 1 for p in passes] == [True, False]
    assert [(p.q_len_lo, p.q_len_hi) for p in passes][0] == (0, 8)
    _check_attention(seqs, 2, 1, 64, 16, torch.float32, block_m=16)


def test_attention_decode_plan_is_one_pass():
    passes = plan_passes(4, 4, 8, 4, 128, torch.float16, 1, 4096, DEVICE)
    assert len(passes) == 1 and passes[0].num_tiles == 4 and passes[0].block_m == 16
    # batch 1 too: 128-key tiles were faster alone but slower end to end (8B, H100; benchmarks/NOTES.md)
    (lone,) = plan_passes(1, 1, 8, 4, 128, torch.float16, 1, 4096, DEVICE)
    assert passes[0].block_n == 64 and lone.block_n == 64
    _check_attention([(1, 300)], 8, 2, 128, 16, torch.float16, num_splits=2)
    _check_attention([(1, 77)], 8, 2, 64, 16, torch.float16)


@pytest.mark.parametrize("window", [0, 8, 21])
def test_attention_tile_edges(window):
    # Whole key tiles that every row sees skip the mask. Cached prefixes of every length mod
    # BLOCK_N put the causal diagonal and the window's lower edge at every offset in a key tile, so
    # an off-by-one in the unmasked range shows up as a leaked key.
    seqs = [(1, 40), *[(3, ctx + 3) for ctx in range(10, 26)], (20, 45)]
    _check_attention(seqs, 2, 2, 64, 16, torch.float32, window=window, block_m=16, block_n=16)


def test_attention_launch_overrides():
    # the tuning overrides of the prefill pass (warps, stages) reach its plan and leave the decode
    # pass's heuristics alone; the result stays right under them
    overrides = dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    decode, prefill = plan_passes(40, 5, 2, 2, 64, torch.float16, 20, 70, DEVICE, **overrides)
    assert (prefill.block_m, prefill.block_n, prefill.num_warps, prefill.num_stages) == (64, 32, 4, 2)
    default_decode = plan_passes(40, 5, 2, 2, 64, torch.float16, 20, 70, DEVICE)[0]
    assert (decode.num_warps, decode.num_stages) == (default_decode.num_warps, default_decode.num_stages)
    _check_attention(MIXED, 4, 2, 64, 16, torch.float16, **overrides)


@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_attention_other_head_dims(head_dim):
    _check_attention(MIXED[:5], 4, 2, head_dim, 16, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # padding's unwritten partials
def test_attention_padded_tokens_left_alone():
    # a graph-padded batch: q has rows past query_start_loc[-1]; the real rows must be right and the
    # padding programs must not write over them (searched tiles and split merges both see padding)
    # (a decode step's merge maps token t to sequence t without a search: padding tokens are t >= S)
    for seqs in (MIXED, DECODE):
        args = _paged_batch(seqs, 4, 2, 64, 16, torch.float32, extra_tokens=9)
        num_real = int(args[5][-1])
        ref = _ref("paged_attention")(*args, 0)
        for overrides in ({}, {"block_m": 16, "num_splits": 3}):
            out = paged_attention(*args, 0, **overrides)
            torch.testing.assert_close(out[:num_real], ref[:num_real], **TOL[torch.float32])


# the merge computes padding tokens from partials no pass wrote (only their store is masked off)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_attention_decode_step_merge_writes_only_real_tokens():
    # a decode step (no sequence with more than one new token) whose merge skips the sequence search:
    # a sequence without a token in the middle shifts tokens against sequences, and padding rows past
    # query_start_loc[-1] must stay unwritten
    seqs = [(1, 150), (0, 9), (1, 64), (1, 97)]
    args = _paged_batch(seqs, 4, 2, 64, 16, torch.float32, extra_tokens=5)
    num_real = int(args[5][-1])
    ref = _ref("paged_attention")(*args, 0)
    out = torch.full_like(args[0], 7.0)
    paged_attention(*args, 0, num_splits=3, out=out)
    torch.testing.assert_close(out[:num_real], ref[:num_real], **TOL[torch.float32])
    assert bool((out[num_real:] == 7.0).all())


def test_attention_writes_into_a_given_buffer():
    # the piecewise graphs hand their static attention-output rows in: no result tensor, no copy
    args = _paged_batch(MIXED, 4, 2, 64, 16, torch.float32)
    expect = paged_attention(*args, 0)
    rows = args[0].shape[0]
    buf = torch.full((rows + 5, 4, 64), float("nan"), device=DEVICE)
    got = paged_attention(*args, 0, out=buf[:rows])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:rows], expect, rtol=0, atol=0)
    assert buf[rows:].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        paged_attention(*args, 0, out=buf[: rows - 1])


def test_attention_rejects_bad_shapes():
    args = list(_paged_batch(DECODE, 4, 2, 64, 16, torch.float32))
    with pytest.raises(ValueError, match="head dims"):
        paged_attention(args[0][..., :48].contiguous(), *args[1:], 0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(args[0][:, :3].contiguous(), *args[1:], 0)


# ----------------------------------------------------------------------------- custom-op checks


def _spec_class(v: int) -> str:
    # the classes Triton specialises an int argument on
    return "one" if v == 1 else "div16" if v % 16 == 0 else "other"


def test_step_varying_int_args_are_not_specialised(monkeypatch):
    """An int argument that changes with the batch (sequence count, tile count, splits, rows) must be
    unspecialised: otherwise the first step of each new shape class compiles a kernel mid-run."""
    from kiln.plugins.triton import greedy_sample as gs
    from kiln.plugins.triton import paged_attention as pa

    kernels = {k.__name__: k for k in (pa._attention_tile_kernel, pa._merge_splits_kernel,
                                       gs._greedy_partial_kernel, gs._greedy_merge_kernel)}  # fmt: skip
    seen: dict[str, dict[str, set[str]]] = {name: {} for name in kernels}
    constexprs: dict[str, dict[str, set]] = {name: {} for name in kernels}
    for name, k in kernels.items():
        arg_names = list(inspect.signature(k.fn).parameters)

        def record(*args, grid, warmup, _run=k.run, _name=name, _names=arg_names, **kw):
            for n, a in zip(_names, args, strict=False):
                if isinstance(a, int) and not isinstance(a, bool) and not n.startswith("stride"):
                    seen[_name].setdefault(n, set()).add(_spec_class(a))
            for n, a in kw.items():  # constexprs and launch options: each value is its own variant
                constexprs[_name].setdefault(n, set()).add(a)
            return _run(*args, grid=grid, warmup=warmup, **kw)

        monkeypatch.setattr(k, "run", record)
    for seqs in (DECODE, DECODE[:1], [(1, 40)] * 16, [(1, 40)] * 17, MIXED, [(16, 16)] * 3):
        args = _paged_batch(seqs, 4, 2, 64, 16, torch.float32)
        paged_attention(*args, 0)
    for rows in (1, 3, 16, 17):
        greedy_sample(torch.randn(rows, 3000, device=DEVICE))
    for name, k in kernels.items():
        fixed = set(getattr(k, "kwargs", {}).get("do_not_specialize") or getattr(k, "do_not_specialize", []))
        varying = {n for n, classes in seen[name].items() if len(classes) > 1}
        assert varying <= fixed, f"{name}: {sorted(varying - fixed)} vary by step but are specialised"
    # The attention tile kernel's variants are its passes' (decode / prefill tiles, split or not,
    # mapped by search or not), which start-up's warm-up steps run; the other kernels have one.
    for name in ("_merge_splits_kernel", "_greedy_partial_kernel", "_greedy_merge_kernel"):
        many = {n: sorted(v) for n, v in constexprs[name].items() if len(v) > 1}
        assert not many, f"{name}: constexprs {many} follow the batch (a new variant compiles mid-run)"


def test_a_pass_launches_one_variant_whether_or_not_the_other_pass_splits(monkeypatch):
    """Triton's variant key holds every pointer's dtype and every int's class (strides too). The
    prefill pass of a step whose decode pass splits must match the one of a step where nothing splits:
    start-up cannot run every pairing of the two passes (a served step compiled one mid-run)."""
    from kiln.plugins.triton import paged_attention as pa

    k = pa._attention_tile_kernel
    names = list(inspect.signature(k.fn).parameters)
    fixed = set(getattr(k, "kwargs", {}).get("do_not_specialize") or getattr(k, "do_not_specialize", []))
    launches = []

    def record(*args, grid, warmup, _run=k.run, **kw):
        key = tuple(
            str(a.dtype)
            if isinstance(a, torch.Tensor)
            else _spec_class(a)
            if type(a) is int
            else type(a).__name__
            for n, a in zip(names, args, strict=False)
            if n not in fixed
        )
        launches.append((kw["BLOCK_M"], kw["SPLIT"], key))
        return _run(*args, grid=grid, warmup=warmup, **kw)

    monkeypatch.setattr(k, "run", record)
    from kiln.plugins.triton import attention_plan

    monkeypatch.setattr(attention_plan, "num_sms", lambda device: 8)  # few SMs: a lone decode row splits
    args = _paged_batch([(1, 900), (256, 256)], 4, 2, 64, 16, torch.float16)
    keys = {}
    for splits in (None, 1):  # the planner's (the decode pass splits, the prefill pass not), then none
        launches.clear()
        paged_attention(*args, 0, num_splits=splits)
        decode = [split for bm, split, _ in launches if bm <= 16]
        prefill = [(split, key) for bm, split, key in launches if bm > 16]
        assert decode == [splits is None] and len(prefill) == 1 and not prefill[0][0]
        keys[splits] = prefill[0][1]
    assert keys[None] == keys[1]


def test_opcheck_norms_activation():
    x = torch.randn(3, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    torch.library.opcheck(get_plugin("rms_norm").forward_op, (x, w, 1e-6))
    torch.library.opcheck(get_plugin("fused_add_rms_norm").forward_op, (x, torch.randn_like(x), w, 1e-6))
    torch.library.opcheck(get_plugin("silu_and_mul").forward_op, (torch.randn(3, 128, device=DEVICE),))


def test_opcheck_skinny_linear():
    x, w = torch.randn(3, 96, device=DEVICE), torch.randn(40, 96, device=DEVICE)
    torch.library.opcheck(get_plugin("skinny_linear").forward_op, (x, w))
    torch.library.opcheck(get_plugin("skinny_linear").forward_op, (torch.randn(12, 96, device=DEVICE), w))


def test_opcheck_rope_kv_write():
    q, k, v = (torch.randn(5, h, 64, device=DEVICE) for h in (4, 2, 2))
    caches = [torch.zeros(2, 16, 2, 64, device=DEVICE) for _ in range(2)]
    slots = torch.tensor([3, -1, 17, 0, 30], device=DEVICE)
    positions = torch.arange(5, device=DEVICE)
    torch.library.opcheck(
        get_plugin("rope_kv_write").forward_op, (q, k, v, positions, _cos_sin_cache(16, 64), *caches, slots)
    )


def test_opcheck_paged_attention():
    args = _paged_batch([(1, 20), (3, 9)], 4, 2, 64, 16, torch.float32)
    torch.library.opcheck(get_plugin("paged_attention").forward_op, (*args, 0))


@pytest.mark.parametrize("seqs", [[(1, 20), (3, 9)], [(40, 40)]], ids=["triton-path", "sdpa-path"])
def test_opcheck_paged_attention_sdpa(seqs):
    args = _paged_batch(seqs, 4, 2, 64, 16, torch.float32)
    torch.library.opcheck(get_plugin("paged_attention_sdpa").forward_op, (*args, 0))


# ----------------------------------------------------------------------------- GPU only


@gpu
@pytest.mark.gpu
def test_gpu_bf16_norms_activation_rope():
    dtype = torch.bfloat16
    x = torch.randn(37, 4096, dtype=dtype, device=DEVICE)
    res = torch.randn_like(x)
    w = torch.randn(4096, dtype=dtype, device=DEVICE)
    _assert_rounds_like(rms_norm(x, w, 1e-6), _ref("rms_norm")(x, w, 1e-6))
    out, res_out = fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = _ref("fused_add_rms_norm")(x, res, w, 1e-6)
    assert torch.equal(res_out, ref_res)
    _assert_rounds_like(out, ref_out)
    g = torch.randn(37, 2 * 14336, dtype=dtype, device=DEVICE)
    _assert_rounds_like(silu_and_mul(g), _ref("silu_and_mul")(g))
    _check_rope_kv_write(300, 32, 8, 128, 16, dtype)  # bit-exact in bf16


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,group,block_size", [(64, 1, 16), (128, 4, 32), (128, 8, 16), (256, 2, 16)])
@pytest.mark.parametrize("window", [0, 40])
def test_gpu_attention_mixed(dtype, head_dim, group, block_size, window):
    seqs = [(1, 1), (1, 300), (1, 77), (1, 1025), (64, 64), (100, 612), (333, 1000), (5, 129)]
    _check_attention(seqs, 2 * group, 2, head_dim, block_size, dtype, window=window)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 3])
def test_gpu_attention_passes_on_two_streams_give_the_same_output(num_splits):
    # decode rows at long contexts beside two chunks: both passes run, the decode one on a side stream
    seqs = [(1, 2000)] * 40 + [(700, 700), (300, 1300)]
    args = _check_attention(seqs, 32, 8, 128, 32, torch.bfloat16, num_splits=num_splits, overlap_passes=True)
    one_stream = paged_attention(*args, 0, num_splits=num_splits, overlap_passes=False)
    two_streams = paged_attention(*args, 0, num_splits=num_splits, overlap_passes=True)
    assert torch.equal(one_stream, two_streams)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_gpu_greedy_sample_bf16_llama_vocab(rows):
    _check_greedy((torch.randn(rows, 128256, device=DEVICE) * 3).to(torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (3072, 2048)])
def test_gpu_skinny_gemm_bf16_model_shapes(m, n, k):
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(torch.bfloat16)
    ref = (x.float() @ w.float().T).to(torch.bfloat16)
    torch.testing.assert_close(skinny_gemm(x, w), ref, **TOL[torch.bfloat16])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_skinny_gemm_prologues_bf16_llama_shapes(m):
    h, inter = 4096, 14336
    x, residual = (torch.randn(m, h, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    norm_w = (1 + 0.1 * torch.randn(h, device=DEVICE)).to(torch.bfloat16)
    w_qkv = (torch.randn(6144, h, device=DEVICE) / h**0.5).to(torch.bfloat16)
    normed, res_ref = _ref("fused_add_rms_norm")(x, residual, norm_w, 1e-5)
    out, res_out = add_rms_norm_skinny_gemm(x, residual, norm_w, 1e-5, w_qkv)
    assert torch.equal(res_out, res_ref)
    torch.testing.assert_close(
        out, (normed.float() @ w_qkv.float().T).to(torch.bfloat16), **TOL[torch.bfloat16]
    )
    gate_up = torch.randn(m, 2 * inter, device=DEVICE).to(torch.bfloat16)
    w_down = (torch.randn(h, inter, device=DEVICE) / inter**0.5).to(torch.bfloat16)
    act = _ref("silu_and_mul")(gate_up)
    out = silu_mul_skinny_gemm(gate_up, w_down)
    torch.testing.assert_close(
        out, (act.float() @ w_down.float().T).to(torch.bfloat16), **TOL[torch.bfloat16]
    )


@gpu
@pytest.mark.gpu
def test_gpu_attention_fp32_is_ieee():
    # TF32 dots would miss by ~1e-3; ieee dots agree with the fp32 reference to summation order
    _check_attention([(1, 500), (1, 33), (200, 700)], 8, 2, 128, 16, torch.float32)
    _check_attention([(1, 500), (1, 2000)], 8, 2, 128, 16, torch.float32, num_splits=4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_long_context(dtype):
    # small batch, long contexts: the split-kv path chosen by the heuristic
    seqs = [(1, 32768), (1, 20001), (1, 4097)]
    assert plan_passes(3, 3, 8, 4, 128, dtype, 1, 32768, DEVICE)[0].num_splits > 1
    _check_attention(seqs, 32, 8, 128, 16, dtype)
    _check_attention([(1, 30000), (512, 16384)], 32, 8, 128, 32, dtype)
    _check_attention([(1, 32768), (1, 9000)], 32, 8, 128, 16, dtype, window=4096)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 256])
def test_gpu_attention_large_prefill(window):
    seqs = [(1, 3000), (1, 50), (2048, 2048), (1024, 3000), (700, 701)]
    _check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, window=window)


def _check_sdpa_plugin(monkeypatch, seqs, heads, kv_heads, head_dim, block_size, dtype, window=0, extra=0):
    """paged_attention_sdpa against the reference; -> how many calls took the SDPA path."""
    from kiln.plugins import sdpa_prefill

    taken = []
    real = sdpa_prefill.fresh_prompt_attention
    monkeypatch.setattr(sdpa_prefill, "fresh_prompt_attention", lambda *a: taken.append(1) or real(*a))
    args = _paged_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, extra_tokens=extra)
    out = get_plugin("paged_attention_sdpa").forward_impl(*args, window)
    ref = _ref("paged_attention")(*args, window)
    n = sum(q for q, _ in seqs)  # rows past the packed tokens are padding: left unwritten
    torch.testing.assert_close(out[:n], ref[:n], **TOL[dtype])
    return len(taken)


@pytest.mark.parametrize("length,extra", [(37, 0), (128, 5), (200, 0)])
def test_sdpa_plugin_lone_fresh_prompt(monkeypatch, length, extra):
    # one prompt, nothing cached before it: SDPA on the prompt padded to a multiple of 128, reading no
    # KV past the prompt (the cache is NaN there) and leaving q's padding rows alone
    assert _check_sdpa_plugin(monkeypatch, [(length, length)], 4, 2, 64, 16, torch.float32, extra=extra) == 1


@pytest.mark.parametrize(
    "seqs,window", [(MIXED, 0), ([(30, 50)], 0), ([(40, 40)], 16), ([(9, 9), (5, 5)], 0)]
)
def test_sdpa_plugin_other_steps_take_the_paged_kernel(monkeypatch, seqs, window):
    # a batch, a cached prefix, a sliding window, two fresh prompts: the Triton kernel, same contract
    assert _check_sdpa_plugin(monkeypatch, seqs, 4, 2, 64, 16, torch.float32, window=window) == 0


def _split_step(monkeypatch, seqs, min_work=1, extra=0, shape=(4, 2, 64, 16), dtype=torch.float32,
                in_order=False, in_place=None):  # fmt: skip
    """forward_into of paged_attention_sdpa with the step's FreshPrompts, against the reference;
    -> the SDPA calls (prompt length, prompts in the call) and the sequence counts the Triton kernel saw.
    ``in_order``: blocks given in packed order, and the step's block updates tell FreshPrompts so;
    ``in_place`` (a list) collects each call's first block read in place (-1: gathered)."""
    from kiln.engine.attention_metadata import FreshPrompts
    from kiln.plugins import sdpa_prefill
    from kiln.plugins.attention import PagedAttention

    monkeypatch.setattr(sdpa_prefill, "MIN_SPLIT_WORK", min_work)
    taken, paged, seen = [], [], in_place if in_place is not None else []
    real = sdpa_prefill.fresh_prompt_attention
    monkeypatch.setattr(  # a: k_cache, v_cache, block_tables (a row per prompt), length, scale[, first block]
        sdpa_prefill,
        "fresh_prompt_attention",
        lambda q, *a: taken.append((a[3], len(a[2]))) or seen.append(a[5]) or real(q, *a),
    )
    real_into = PagedAttention.forward_into

    def counted_into(self, out, q, k_cache, v_cache, block_tables, seq_lens, *rest):
        paged.append(seq_lens.shape[0])
        real_into(self, out, q, k_cache, v_cache, block_tables, seq_lens, *rest)

    monkeypatch.setattr(PagedAttention, "forward_into", counted_into)
    args = _paged_batch(seqs, *shape, dtype, extra_tokens=extra, in_order=in_order)
    computed = np.array([kv - q for q, kv in seqs])
    new = np.array([q for q, _ in seqs])
    num_decode = next((i for i, (q, kv) in enumerate(seqs) if q != 1 or kv == 1), len(seqs))
    block = shape[3]
    tables = args[3].cpu().numpy()
    updates = np.array(
        [(s, j, tables[s, j]) for s, (_, kv) in enumerate(seqs) for j in range(-(-kv // block))]
    )
    fresh = FreshPrompts.of_step(computed, new, num_decode, np.arange(len(seqs)), updates, block)
    out = torch.full_like(args[0], float("nan"))
    get_plugin("paged_attention_sdpa").into_impl(out, *args, 0, fresh_prompts=fresh)
    n = int(new.sum())
    torch.testing.assert_close(out[:n], _ref("paged_attention")(*args, 0)[:n], **TOL[dtype])
    return taken, paged


def test_fresh_prompts_of_a_step():
    from kiln.engine.attention_metadata import FreshPrompts

    # decodes, a chunk with a cached prefix, then two fresh prompts: the trailing run is the last two
    f = FreshPrompts.of_step(np.array([16, 7, 30, 0, 0]), np.array([1, 1, 12, 40, 9]), 2)
    assert f == FreshPrompts(first_seq=3, starts=(14, 54), lengths=(40, 9), rest_max_query_len=12,
                             rest_max_seq_len=42, prefixes=(0, 0))  # fmt: skip
    # a fresh prompt before a chunk with a long prefix is not trailing; decode rows never count
    assert FreshPrompts.of_step(np.array([0, 5]), np.array([8, 3]), 0) is None
    assert FreshPrompts.of_step(np.array([0, 0]), np.array([1, 1]), 2) is None
    every = FreshPrompts.of_step(np.array([0, 0]), np.array([5, 6]), 0)
    assert every == FreshPrompts(0, (0, 5), (5, 6), 0, 0, prefixes=(0, 0))
    # a chunk after a short cached prefix (at most 1.25x the chunk) joins the run: 10 after 12 does
    short = FreshPrompts.of_step(np.array([16, 12, 0]), np.array([1, 10, 12]), 1)
    assert short == FreshPrompts(1, (1, 11), (10, 12), 1, 17, prefixes=(12, 0))
    assert FreshPrompts.of_step(np.array([16, 13, 0]), np.array([1, 10, 12]), 1).first_seq == 2
    # a one-token row after one cached token is never taken (it may be a decode row)
    assert FreshPrompts.of_step(np.array([1, 0]), np.array([1, 9]), 0).first_seq == 1
    # prefix + chunk past the step's 16 tokens (a shape start-up did not build): the paged kernel
    assert FreshPrompts.of_step(np.array([16, 8, 0]), np.array([1, 10, 5]), 1).first_seq == 2


def test_sdpa_plugin_splits_off_trailing_fresh_prompts(monkeypatch):
    # decode rows and a chunk after its prefix to the Triton kernel (3 sequences), the two fresh prompts
    # to SDPA, all in one call; the last prompt's padding rows are copied (q ends with it)
    seqs = [(1, 17), (1, 33), (12, 40), (37, 37), (20, 20)]
    taken, paged = _split_step(monkeypatch, seqs)
    assert taken == [(37, 1), (20, 1)] and paged == [3]
    # only fresh prompts: no Triton launch at all; q rows to spare stand in as the last one's padding
    taken, paged = _split_step(monkeypatch, [(30, 30), (130, 130)], extra=200)
    assert taken == [(30, 1), (130, 1)] and paged == []


@pytest.mark.parametrize("block_size", [16, 48])
def test_sdpa_plugin_batches_fresh_prompts_of_one_length(monkeypatch, block_size):
    # equal prompts of whole 128-token lengths go to SDPA together (one call, q rows read in place, the
    # pages of all gathered at once); other lengths alone; a cache of NaN past the prompts (block 48: a
    # prompt's last page runs past its 128 tokens) reaches no row
    seqs = [(1, 40), (30, 90)] + [(128, 128)] * 3 + [(50, 50), (256, 256), (256, 256)]
    taken, paged = _split_step(monkeypatch, seqs, shape=(4, 2, 64, block_size))
    assert taken == [(128, 3), (50, 1), (256, 2)] and paged == [2]
    taken, _ = _split_step(monkeypatch, [(128, 128)] * 8)
    assert taken == [(128, 8)]


def test_sdpa_plugin_reads_fresh_prompts_in_place_when_their_blocks_run_in_order(monkeypatch):
    # blocks given in packed order: equal prompts of whole pages and whole PAD_TOKENS are read where they
    # lie, one view for the run; a prompt with padding keys (50) or a run whose blocks do not follow is
    # gathered. The NaN-filled cache past the prompts makes any wrong row show.
    seqs = [(1, 40), (30, 90)] + [(128, 128)] * 3 + [(50, 50), (256, 256)]
    seen: list[int] = []
    taken, paged = _split_step(monkeypatch, seqs, in_order=True, in_place=seen)
    assert taken == [(128, 3), (50, 1), (256, 1)] and paged == [2]
    first = 1 + sum(-(-kv // 16) for _, kv in seqs[:2])  # the first fresh prompt's block
    assert seen == [first, -1, first + 3 * 8 + 4]
    monkeypatch.undo()
    shuffled: list[int] = []
    _split_step(monkeypatch, seqs, in_place=shuffled)  # shuffled blocks: all gathered
    assert shuffled == [-1, -1, -1]


def test_in_place_block():
    from kiln.plugins.sdpa_prefill import in_place_block

    blocks = (5, 9, 13, 40)
    assert in_place_block(blocks, 0, 3, 128, 32) == 5  # 4 pages each, in a row
    assert in_place_block(blocks, 1, 3, 128, 32) == -1  # 13 -> 40 breaks the run
    assert in_place_block(blocks, 3, 1, 128, 32) == 40
    assert in_place_block(blocks, 0, 1, 100, 32) == -1  # padding keys past the prompt: gathered
    assert in_place_block(blocks, 0, 1, 128, 48) == -1  # not whole pages
    assert in_place_block((), 0, 1, 128, 32) == -1 and in_place_block((-1,), 0, 1, 128, 32) == -1


def test_consecutive_first_blocks():
    from kiln.engine.attention_metadata import consecutive_first_blocks

    # slot 3: blocks 7, 8, 9 at indices 0-2; slot 5: 20, 22 (a gap); slot 6: index 0 missing this step
    updates = np.array([(3, 0, 7), (3, 1, 8), (3, 2, 9), (5, 0, 20), (5, 1, 22), (6, 1, 30), (8, 0, 10)])
    got = consecutive_first_blocks(np.array([3, 5, 6, 8, 3]), np.array([3, 2, 1, 2, 2]), updates)
    assert got == (7, -1, -1, -1, 7)  # slot 8 has one block of the two it needs
    assert consecutive_first_blocks(np.array([1]), np.array([1]), np.zeros((0, 3))) == (-1,)


def test_sdpa_runs():
    from kiln.plugins.sdpa_prefill import sdpa_runs

    # 8B rows (4,096 wide): 512 tokens and up are worth batching; 384 is not, nor 1,000 (not whole 128s);
    # at most 8 a call
    assert sdpa_runs((2048, 2048, 2048, 1700), 4096) == [(0, 3), (3, 1)]
    assert sdpa_runs((384, 384, 1000, 1000), 4096) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert sdpa_runs((512,) * 9 + (1024, 1024), 4096) == [(0, 8), (8, 1), (9, 2)]


def test_sdpa_plugin_takes_chunks_after_a_short_prefix(monkeypatch):
    # a chunk of 40 after 36 cached tokens: SDPA over all 76 keys, the 36 q rows before the chunk (decode
    # rows' queries) standing in for the prefix's; the fresh prompts after it as before
    seqs = [(1, 9)] * 40 + [(40, 76), (128, 128), (128, 128)]
    taken, paged = _split_step(monkeypatch, seqs)
    assert taken == [(76, 1), (128, 2)] and paged == [40]
    # nothing before the chunk to stand in: its queries are copied after zero rows
    taken, paged = _split_step(monkeypatch, [(40, 50), (30, 30)])
    assert taken == [(50, 1), (30, 1)] and paged == []
    # a prefix longer than 1.25x the chunk: the paged kernel, with the decode rows
    taken, paged = _split_step(monkeypatch, [(1, 9), (40, 91), (30, 30)])
    assert taken == [(30, 1)] and paged == [2]


@settings(max_examples=40, deadline=None)
@given(
    decode=st.lists(st.integers(1, 40), max_size=3),
    chunk=st.one_of(
        st.none(), st.tuples(st.sampled_from([2, 7, 16, 32]), st.sampled_from([0, 5, 16, 20, 48]))
    ),
    prompts=st.lists(st.sampled_from([16, 32, 20]), min_size=1, max_size=4),
    in_order=st.booleans(),
    extra=st.sampled_from([0, 40]),
)
def test_sdpa_plugin_split_matches_the_reference_on_any_step(decode, chunk, prompts, in_order, extra):
    # any mix of decode rows, a chunk after a prefix (short or long), fresh prompts (batchable or not,
    # here with 16-token padding), blocks in order or shuffled: the same output as the reference
    from kiln.plugins import sdpa_prefill

    seqs = [(1, kv) for kv in decode] + ([(chunk[0], chunk[0] + chunk[1])] if chunk else [])
    seqs += [(n, n) for n in prompts]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa_prefill, "PAD_TOKENS", 16)
        taken, _ = _split_step(mp, seqs, extra=extra, in_order=in_order)
    assert sum(n for _, n in taken) >= 1  # the last prompt is always SDPA's


@settings(max_examples=30, deadline=None)
@given(
    decode=st.lists(st.integers(1, 30), max_size=3),
    chunk=st.one_of(st.none(), st.tuples(st.integers(2, 20), st.integers(0, 25))),
    prompts=st.lists(st.sampled_from([8, 16, 5, 24]), min_size=1, max_size=4),
)
def test_sdpa_plugin_steps_use_only_shapes_the_warm_up_built(decode, chunk, prompts):
    # cuDNN builds a plan per shape and strides: every SDPA call a step of up to 64 tokens makes must
    # have the shape and strides of one of warm_up's calls (8-token padding, batching from 8 tokens)
    from kiln.plugins import sdpa_prefill

    seqs = [(1, kv) for kv in decode] + ([(chunk[0], chunk[0] + chunk[1])] if chunk else [])
    seqs += [(n, n) for n in prompts]
    assume(sum(q for q, _ in seqs) <= 64)
    warmed: set[tuple] = set()
    used: set[tuple] = set()
    into = [warmed]  # where the calls go: the warm-up's, then the steps'
    real = sdpa_prefill.causal_sdpa

    def recorded(q, k, v, scale):
        into[0].add((q.shape, q.stride(), k.shape, k.stride()))
        return real(q, k, v, scale)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa_prefill, "PAD_TOKENS", 8)
        mp.setattr(sdpa_prefill, "MIN_SPLIT_WORK", 8 * 4 * 64)
        mp.setattr(sdpa_prefill, "causal_sdpa", recorded)
        sdpa_prefill.warm_up(4, 2, 64, 0.125, torch.float32, DEVICE, 64, 16)
        into[0] = used
        for in_order in (False, True):
            _split_step(mp, seqs, in_order=in_order)
    assert used and used <= warmed


def test_sdpa_plugin_leaves_many_or_short_fresh_prompts_to_the_paged_kernel(monkeypatch):
    # the default work floor (here 4 heads x 64 wide: 8,192 tokens a prompt on average) and the count
    # cap (8): one Triton call for all
    taken, paged = _split_step(monkeypatch, [(1, 9), (40, 40), (30, 30)], min_work=1 << 21)
    assert taken == [] and paged == [3]
    many = [(1, 9)] + [(5, 5)] * 9
    taken, paged = _split_step(monkeypatch, many)
    assert taken == [] and paged == [10]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "overlap"])
@pytest.mark.parametrize("in_order", [False, True], ids=["gathered", "in-place"])
def test_gpu_sdpa_split_bf16(monkeypatch, in_order, overlap):
    # a 2048/128-like mixed step at Llama-3.1-8B's shapes: decodes at ~2k, a chunk of 700 after 800
    # cached (SDPA over all 1,500 keys), two whole prompts (one cuDNN call; with blocks in order, K/V read
    # where they lie) and a partial one, with the default work floor
    # (KILN_ATTENTION_OVERLAP: the decode rows on a side stream beside the SDPA calls)
    from kiln.plugins.triton import paged_attention as triton_attention

    monkeypatch.setattr(triton_attention, "OVERLAP_PASSES", overlap)
    seqs = [(1, 2100)] * 6 + [(700, 1500), (2048, 2048), (2048, 2048), (900, 900)]
    seen: list[int] = []
    shape, bf16 = (32, 8, 128, 32), torch.bfloat16
    taken, paged = _split_step(monkeypatch, seqs, min_work=1 << 21, shape=shape, dtype=bf16,
                               in_order=in_order, in_place=seen)  # fmt: skip
    assert taken == [(1500, 1), (2048, 2), (900, 1)] and paged == [6]
    assert seen[0] == -1 and (seen[1] > 0) == in_order and seen[2] == -1


def test_sdpa_variants_follow_the_split(monkeypatch):
    from kiln.plugins import sdpa_prefill
    from kiln.plugins.triton.attention_plan import step_variants

    variants_of = step_variants(2, 2, 64, torch.float32, DEVICE)
    split = sdpa_prefill.without_fresh_prompts(variants_of, 4 * 64, split_up_to=32768)
    computed, new = [16, 30, 0, 0], [1, 12, 9000, 8500]  # decode, chunk, two long fresh prompts
    assert split(computed, new) == variants_of(computed[:2], new[:2]) != variants_of(computed, new)
    assert split([0, 0], [9000, 8500]) == set() and split([0], [3000]) == set()
    assert split([16, 0, 0], [1, 900, 800]) == variants_of([16, 0, 0], [1, 900, 800])  # too little work
    # past split_up_to (a step that runs outside the piecewise graphs): only a lone prompt is taken
    eager_only = sdpa_prefill.without_fresh_prompts(variants_of, 4 * 64, split_up_to=0)
    assert eager_only(computed, new) == variants_of(computed, new) and eager_only([0], [3000]) == set()


def test_sdpa_plugin_warm_up_runs_every_shape_a_step_gives_it(monkeypatch):
    from kiln.plugins import sdpa_prefill

    shapes = []
    real = sdpa_prefill.causal_sdpa

    def layout(t: torch.Tensor) -> tuple:
        return tuple(t.shape), t.stride()

    monkeypatch.setattr(
        sdpa_prefill,
        "causal_sdpa",
        lambda q, k, v, s: shapes.append((layout(q), layout(k))) or real(q, k, v, s),
    )
    # each padded length alone; below the work floor (4 heads x 64 wide: 8,192 tokens) nothing batched
    assert sdpa_prefill.warm_up(4, 2, 64, 0.125, torch.float32, DEVICE, 300, 16) == 3
    assert [(q[0], k[0]) for q, k in shapes] == [((1, n, 4, 64), (1, n, 2, 64)) for n in (128, 256, 384)]
    # a prompt of 300 tokens then runs at a warmed-up shape, with the same strides (cuDNN's plan key)
    warmed = shapes[-1]
    shapes.clear()
    _check_sdpa_plugin(monkeypatch, [(300, 300)], 4, 2, 64, 16, torch.float32)
    assert shapes == [warmed]
    # lengths the step batches: n of them at a time wherever n x length fits the step
    monkeypatch.setattr(sdpa_prefill, "MIN_SPLIT_WORK", 1)
    shapes.clear()
    assert sdpa_prefill.warm_up(4, 2, 64, 0.125, torch.float32, DEVICE, 300, 16) == 4
    assert [q[0][:2] for q, _ in shapes] == [(1, 128), (2, 128), (1, 256), (1, 384)]
    warmed = shapes[1]
    shapes.clear()  # two 128-token prompts after a decode row: one call, at the warmed-up strides,
    taken, _ = _split_step(monkeypatch, [(1, 9), (128, 128), (128, 128)])
    assert taken == [(128, 2)] and shapes == [warmed]
    shapes.clear()  # and so when their K/V are read in place
    _split_step(monkeypatch, [(1, 9), (128, 128), (128, 128)], in_order=True, in_place=(seen := []))
    assert seen[-1] > 0 and shapes == [warmed]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("length", [2048, 1000])
def test_gpu_sdpa_plugin_lone_prompt_bf16(monkeypatch, length):
    assert _check_sdpa_plugin(monkeypatch, [(length, length)], 32, 8, 128, 32, torch.bfloat16) == 1


@gpu
@pytest.mark.gpu
def test_gpu_attention_cuda_graph_replay():
    # The grid depends only on shapes and int args: a graph captured once stays right while the
    # device-side seq_lens, block tables and cache contents change between replays.
    dtype = torch.bfloat16
    full_lens = [1500, 31, 3999, 64]
    q, k_cache, v_cache, tables, seq_lens, qsl, _, _, scale = _paged_batch(
        [(1, n) for n in full_lens], 16, 4, 128, 16, dtype
    )
    seq_lens.copy_(torch.tensor([900, 30, 2000, 5]))  # first capture: shorter histories
    max_seq_len = 4096  # a fixed bound, as a graph runner passes it
    paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 1, max_seq_len, scale, 0)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 1, max_seq_len, scale, 0)
    for step in range(3):
        if step == 1:
            seq_lens.copy_(torch.tensor(full_lens))
        if step == 2:  # move every physical block and remap the tables
            perm = torch.randperm(k_cache.shape[0], device=DEVICE)
            k_cache.copy_(k_cache[perm].clone())
            v_cache.copy_(v_cache[perm].clone())
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=DEVICE)
            valid = tables < k_cache.shape[0]
            tables[valid] = inverse[tables[valid].long()].to(tables.dtype)
            q.copy_(torch.randn_like(q))
        graph.replay()
        ref = _ref("paged_attention")(q, k_cache, v_cache, tables, seq_lens, qsl, 1, max_seq_len, scale, 0)
        torch.testing.assert_close(static_out, ref, **TOL[dtype])


@gpu
@pytest.mark.gpu
def test_gpu_torch_compile():
    dtype = torch.bfloat16
    attention = get_plugin("paged_attention").forward_op
    norm = get_plugin("rms_norm").forward_op
    act = get_plugin("silu_and_mul").forward_op
    args = _paged_batch([(1, 100), (1, 37), (30, 300)], 8, 2, 128, 16, dtype)
    w = torch.randn(128, dtype=dtype, device=DEVICE)

    def block(q):
        h = attention(norm(q, w, 1e-6), *args[1:], 0)
        return act(torch.cat((h, h), dim=-1))

    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(args[0]), block(args[0]), atol=0, rtol=0)
