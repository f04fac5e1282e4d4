"""The fused gate|up GEMM + SiLU-and-mul (kiln/plugins/triton/gemm_silu_mul.py) against the unfused
plain-torch path.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (fp32 and fp16 only) with
small blocks, in every variant (TMA descriptors or pointer loads, persistent or one program a tile);
the ``gpu`` test adds bf16 at a prefill shape of Llama-3.1-8B and a CUDA-graph replay.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch
from triton_env import ON_GPU, skip_module_without_triton  # first: picks the interpreter

skip_module_without_triton()

from kiln.plugins.triton.gemm_silu_mul import (  # noqa: E402
    GemmSiluMulConfig,
    default_config,
    gemm_silu_mul,
    gemm_silu_mul_reference,
    tma_usable,
)

ROOT = Path(__file__).parent.parent
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# the interpreter converts 1-element arrays to ints in loop bounds; numpy 2.3 warns about it each time
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# 16-wide blocks keep the interpreter fast and make the test shapes span several tiles (and more
# tiles than the 8 programs a persistent launch gets on the CPU); GROUP_M=2 leaves partial groups.
_SMALL = GemmSiluMulConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
CONFIGS = {
    "persistent-nested+tma": _SMALL,
    "persistent-nested": dataclasses.replace(_SMALL, tma=False),
    "persistent+tma": dataclasses.replace(_SMALL, flatten=True),
    "tiled+tma": dataclasses.replace(_SMALL, persistent=False),
    "tiled": dataclasses.replace(_SMALL, persistent=False, tma=False),
}
# (M, N, K): one row; ragged everything; 20 tiles (persistent programs loop); N under one block with
# K off the 16-byte grid (TMA falls back to pointers); N off it in fp16 only.
SHAPES = [(1, 24, 40), (37, 40, 48), (50, 72, 64), (20, 8, 50), (33, 20, 40)]
# fp32 only differs from the reference by summation order; fp16 matches the unfused roundings, so
# beyond a tolerance of ~1 ulp nearly every element must be bit-equal.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # atol and rtol


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(2 * n, k, device=DEVICE) / k**0.5).to(dtype)  # gate and up ~ N(0, 1)
    return x, w


def _assert_matches_unfused(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = gemm_silu_mul_reference(x, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=TOL[out.dtype], rtol=TOL[out.dtype])
    if out.dtype != torch.float32:
        exact = (out == ref).float().mean().item()
        assert exact >= 0.98, f"only {exact:.1%} of elements round like the unfused path"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_unfused_path(name, shape, dtype):
    m, n, k = shape
    x, w = _inputs(m, n, k, dtype)
    _assert_matches_unfused(gemm_silu_mul(x, w, CONFIGS[name]), x, w)


@pytest.mark.parametrize("shape", [(5, 24, 40), (70, 136, 72)], ids=["64-row-tiles", "128-row-tiles"])
def test_default_config(shape):
    m, n, k = shape
    x, w = _inputs(m, n, k, torch.float16)
    _assert_matches_unfused(gemm_silu_mul(x, w), x, w)


def test_default_config_is_the_hopper_tile():
    cfg = default_config(8448, 14336, 4096)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (128, 128, 64, 8)
    assert cfg.persistent and cfg.tma and not cfg.flatten
    assert default_config(16, 14336, 4096).block_m == 64
    assert default_config(4096, 14336, 4096, torch.float32).block_k == 32


def test_tma_needs_aligned_rows():
    x, w = _inputs(4, 16, 64, torch.float16)
    out = torch.empty(4, 16, dtype=torch.float16, device=DEVICE)
    assert tma_usable(x, w, out)
    x, w = _inputs(4, 16, 50, torch.float16)  # 100-byte rows
    assert not tma_usable(x, w, out)
    x, w = _inputs(4, 20, 64, torch.float16)
    assert not tma_usable(x, w, torch.empty(4, 20, dtype=torch.float16, device=DEVICE))  # 40-byte rows


def test_empty_shapes():
    x, w = _inputs(0, 8, 16, torch.float32)
    assert gemm_silu_mul(x, w).shape == (0, 8)
    x, w = _inputs(3, 8, 0, torch.float32)
    out = gemm_silu_mul(x, w)
    assert out.shape == (3, 8) and not out.any()


@pytest.mark.parametrize(
    "x_shape, w_shape, dtypes, match",
    [
        ((4, 16), (32,), (torch.float32,) * 2, "x \\[M, K\\] and weight"),
        ((4, 16), (31, 16), (torch.float32,) * 2, "even row count"),
        ((4, 16), (32, 24), (torch.float32,) * 2, "K=16"),
        ((4, 16), (32, 16), (torch.float32, torch.float16), "share a dtype"),
        ((4, 16), (32, 16), (torch.int32,) * 2, "supports fp16, bf16 and fp32"),
    ],
    ids=["weight-1d", "odd-rows", "k-mismatch", "dtype-mismatch", "int"],
)
def test_bad_inputs(x_shape, w_shape, dtypes, match):
    x = torch.zeros(x_shape, dtype=dtypes[0], device=DEVICE)
    w = torch.zeros(w_shape, dtype=dtypes[1], device=DEVICE)
    with pytest.raises(ValueError, match=match):
        gemm_silu_mul(x, w)


def test_non_contiguous_inputs():
    x, w = _inputs(16, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_silu_mul(x.t(), w)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_silu_mul(x, torch.zeros(16, 32, device=DEVICE).t())


@pytest.mark.parametrize(
    "kwargs", [dict(block_m=24), dict(block_k=8), dict(num_warps=3), dict(group_m=0), dict(num_stages=0)]
)
def test_bad_configs(kwargs):
    with pytest.raises(ValueError):
        GemmSiluMulConfig(**kwargs)


def test_bench_script_smoke(tmp_path):
    """scripts/bench_gemm_silu_mul.py end to end on a tiny shape (on the CPU: the interpreter)."""
    report = tmp_path / "bench.json"
    device = "cuda" if ON_GPU else "cpu"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gemm_silu_mul.py"), "--preset", "tiny-llama",
           "--shape", "48,40", "--rows", "40", "--iters", "2", "--device", device,
           "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(report.read_text())["results"]
    assert {(r["k"], r["n"]) for r in rows} == {(64, 128), (48, 40)}
    assert {r["variant"] for r in rows} >= {
        "cublas+silu_and_mul",
        "fused " + default_config(40, 40, 48).label(),
    }
    assert all(r["us"] > 0 for r in rows)


def test_bench_script_only_picks_sweep_entries_and_refuses_others():
    base = [sys.executable, str(ROOT / "scripts" / "bench_gemm_silu_mul.py"), "--shape", "48,40",
            "--rows", "40", "--iters", "1", "--reps", "1", "--device", "cuda" if ON_GPU else "cpu",
            "--sweep"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(base + ["--only", "0", "7"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("fused ") == 2 and " g4 " in done.stdout
    bad = subprocess.run(base + ["--only", "99"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--only takes entries 0.." in bad.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (compiled Triton kernels)")
@pytest.mark.parametrize("name", ["default", "tiled+tma", "persistent", "flattened"])
def test_gpu_prefill_shape_bf16(name):
    """Llama-3.1-8B's gate|up at a ragged prefill row count, in bf16, then replayed from a CUDA graph
    with new inputs (the descriptors are built at capture and must keep addressing the same buffers)."""
    m, n, k = 2100, 14336, 4096
    x, w = _inputs(m, n, k, torch.bfloat16)
    big = GemmSiluMulConfig()
    cfg = {"default": None, "tiled+tma": dataclasses.replace(big, persistent=False),
           "persistent": dataclasses.replace(big, tma=False),
           "flattened": dataclasses.replace(big, flatten=True)}[name]  # fmt: skip
    out = gemm_silu_mul(x, w, cfg)
    ref = gemm_silu_mul_reference(x, w)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    assert (out == ref).float().mean().item() >= 0.9  # one-ulp gate/up differences from summation order

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm_silu_mul(x, w, cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gemm_silu_mul_reference(x, w), atol=2e-2, rtol=2e-2)
