"""silu(x @ w_gate.T) * (x @ w_up.T) in one GEMM: the gated MLP's gate|up projection with SiLU-and-mul
applied in its epilogue, for prefill-sized row counts.

The unfused step is cuBLAS ``F.linear(x, w_gate_up)`` writing gate|up [M, 2N], then ``silu_and_mul``
reading it back and writing [M, N]. At 8,448 rows of Llama-3.1-8B (K=4,096, N=14,336) that intermediate
is ~968 MB a layer written and read (~0.32 ms at 3 TB/s). This kernel never materialises it; it pays
only while the GEMM itself stays near cuBLAS (~700 TFLOP/s bf16 on an H100), so it is built as a
Hopper GEMM:

* Tiles. A program owns a ``BLOCK_M`` x ``BLOCK_N`` tile of the output and keeps two fp32 accumulators,
  gate and up. Each K step loads x's [BLOCK_M, BLOCK_K] tile once and the two weight tiles (rows
  n.. of the gate half and N+n.. of the up half of the ordinary concatenated [2N, K] weight), then
  issues two MMAs: in effect a BLOCK_M x 2*BLOCK_N tile (128 x 256 by default, Triton's usual best
  Hopper bf16 shape), with 8 warps (two warpgroups) so the two 128 x 128 fp32 accumulators take
  128 registers a thread. Both dots sit in one loop, where Triton makes each an async wgmma.
* Order. Tiles are visited in groups of ``GROUP_M`` row tiles sweeping the column tiles together,
  so a wave of programs shares a few x tiles and a few weight tiles in L2 (the 8B's 235 MB weight
  would otherwise come from memory once per row tile).
* Persistent (default). One program per SM loops over tiles, each tile's K loop filling and
  draining its own pipeline (nested loops, the default: measured on an H100 it ran 10-20% faster
  than ``flatten=True``, where the compiler makes the tile and K loops one software pipeline so the
  next tile's loads are in flight during this tile's epilogue; the epilogue's tile index then comes
  from a second counter, as in Triton's persistent-matmul tutorial). ``persistent=False`` launches
  one program per tile.
* TMA (default). Loads and the store go through host-built tensor descriptors
  (``triton.tools.tensor_descriptor.TensorDescriptor``), passed by value as kernel parameters: the
  copy engine fetches each tile into swizzled shared memory with no address arithmetic in registers
  and clips at the tensor's edges (zero fill), so ragged M, N and K need no masks. Host-built rather
  than ``tl.make_tensor_descriptor``: device-side descriptors need a global ``triton.set_allocator``
  (a per-thread ContextVar the engine's threads would each have to set) and build a descriptor per
  program. TMA needs 16-byte aligned bases and row strides (K and N multiples of 8 in 16-bit types);
  otherwise, on pre-Hopper GPUs, or with ``tma=False``, tiles come through pointer loads: rows past M
  or N are wrapped onto valid rows (their results are never stored), K is masked only when it is
  not a multiple of ``BLOCK_K``, and the store is masked.
* Numerics. Like the unfused path: gate and up are rounded to x's dtype (cuBLAS writes them so), the
  silu is computed in fp32 from the rounded gate and rounded to the dtype, and the product is taken
  in the dtype, launched with fp fusion off, as ``activation.silu_and_mul`` is. What remains is the
  GEMM's summation order, which can move gate or up by one ulp of the dtype.

Compiled for sm_90a (Triton 3.6), the 128 x 128 x 64 tile (measured with flattened loops) issues both
dots as async wgmma, loads through TMA, and takes 187 registers a thread with no spills and 176 KB of
shared memory (3 stages of 48 KB and the epilogue's 32 KB store tile); 4 stages take 224 KB, just
inside the 227 KB limit.

Triton's interpreter (no GPU: ``TRITON_INTERPRET=1``) runs both the TMA and the pointer path, the
persistent and the one-tile-per-program launch; tests use small blocks. The launch configuration is a
frozen ``GemmSiluMulConfig``; ``default_config`` picks it from the shape with no autotuning (the
engine captures CUDA graphs and must not tune during requests). ``scripts/bench_gemm_silu_mul.py``
times it against cuBLAS + ``silu_and_mul`` and sweeps configurations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kiln.plugins.triton._common import _cuda_capability, dot_precision, num_sms


@dataclass(frozen=True)
class GemmSiluMulConfig:
    """Launch configuration. ``block_n`` counts output columns: each tile reads ``block_n`` gate and
    ``block_n`` up weight rows. ``flatten`` (persistent only) makes the tile and K loops one software
    pipeline; without it each tile's K loop fills and drains its own pipeline."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 16
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = True
    tma: bool = True
    flatten: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {v}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"group_m and num_stages must be >= 1, got {self.group_m}, {self.num_stages}")

    def label(self) -> str:
        """A short name for tables: blocks, group, warps, stages and the variant."""
        kind = ("persistent" + ("" if self.flatten else "-nested")) if self.persistent else "tiled"
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} "
                f"s{self.num_stages} {kind}{'+tma' if self.tma else ''}")  # fmt: skip


def default_config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> GemmSiluMulConfig:
    """The launch configuration for x [m, k] and a [2n, k] weight. 128 x (2 x 128) x 64 tiles with
    8 warps and 3 stages (48 KB of operands a stage in 16-bit types, plus 32 KB for the epilogue's
    store: 176 KB of the H100's 227 KB); 64-row tiles with 4 warps when there are at most 64 rows;
    fp32 halves BLOCK_K to keep a stage's bytes the same. Nested loops: of the 13 configurations of
    ``scripts/bench_gemm_silu_mul.py --sweep`` on an H100 (2026-11-28), the fastest at every 1B and 8B
    shape, 2,048 to 8,448 rows (0.97-1.07x cuBLAS + ``silu_and_mul``; flattened: 0.83-0.95x). GROUP_M
    16: on an H200, 1-3% ahead of 8 at 4,096-8,448 rows of both shapes in two sweeps (32 and 64 no
    better), and end to end 2048/128 +1.2% with the attention overlap against +0.4% with GROUP_M 8."""
    del n, k  # every prefill shape of the presets wants the same tiles; kept for shape-aware choices
    block_m, warps = (64, 4) if m <= 64 else (128, 8)
    block_k = 32 if dtype == torch.float32 else 64
    return GemmSiluMulConfig(block_m=block_m, block_k=block_k, num_warps=warps)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M row tiles sweep the column tiles together: a wave reuses their x tiles and the weight
    # tiles it reads, in L2
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % rows
    pid_n = (tile % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _silu_mul(acc_g, acc_u, dtype: tl.constexpr):
    # The unfused roundings: gate and up as the GEMM writes them, silu in fp32 rounded to the dtype,
    # then the product in the dtype (the kernel is launched with fp fusion off, like silu_and_mul)
    g = acc_g.to(dtype)
    u = acc_u.to(dtype)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(dtype)
    return act * u


@triton.jit
def _mainloop_tma(x_desc, g_desc, u_desc, off_m, off_n, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):  # fmt: skip
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        off_k = kt * BLOCK_K
        xt = x_desc.load([off_m, off_k])  # [BLOCK_M, BLOCK_K]; past M or K: zeros
        gt = g_desc.load([off_n, off_k])  # [BLOCK_N, BLOCK_K]
        ut = u_desc.load([off_n, off_k])
        acc_g = tl.dot(xt, gt.T, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, ut.T, acc_u, input_precision=PRECISION)
    return acc_g, acc_u


@triton.jit(do_not_specialize=["M", "num_programs"])
def _gemm_silu_mul_tma_kernel(
    x_desc, g_desc, u_desc, o_desc, M, N, K, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    dtype = o_desc.dtype
    if PERSISTENT:
        tile_c = pid - num_programs  # the epilogue's own counter (see the module docstring)
        num_tiles = num_pid_m * num_pid_n
        for tile in tl.range(pid, num_tiles, num_programs, flatten=FLATTEN):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            acc_g, acc_u = _mainloop_tma(x_desc, g_desc, u_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K,
                                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
            tile_c += num_programs
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], _silu_mul(acc_g, acc_u, dtype))
    else:
        pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
        acc_g, acc_u = _mainloop_tma(x_desc, g_desc, u_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K,
                                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], _silu_mul(acc_g, acc_u, dtype))  # clipped at M, N


@triton.jit
def _mainloop_ptr(x_ptr, g_ptr, u_ptr, pid_m, pid_n, M, N, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    # rows past M (N) wrap onto valid rows: unmasked loads, and their results are never stored
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = g_ptr + rn[:, None] * K + rk[None, :]  # [BLOCK_N, BLOCK_K]
    u_ptrs = u_ptr + rn[:, None] * K + rk[None, :]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            gt = tl.load(g_ptrs)
            ut = tl.load(u_ptrs)
        else:
            k_ok = (rk < K - kt * BLOCK_K)[None, :]
            xt = tl.load(x_ptrs, mask=k_ok, other=0.0)
            gt = tl.load(g_ptrs, mask=k_ok, other=0.0)
            ut = tl.load(u_ptrs, mask=k_ok, other=0.0)
        acc_g = tl.dot(xt, gt.T, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, ut.T, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def _store_ptr(out_ptr, tile, pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(ptrs, tile, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M", "num_programs"])
def _gemm_silu_mul_ptr_kernel(
    x_ptr, g_ptr, u_ptr, out_ptr, M, N, K, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    dtype = out_ptr.dtype.element_ty
    if PERSISTENT:
        tile_c = pid - num_programs
        num_tiles = num_pid_m * num_pid_n
        for tile in tl.range(pid, num_tiles, num_programs, flatten=FLATTEN):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            acc_g, acc_u = _mainloop_ptr(x_ptr, g_ptr, u_ptr, pid_m, pid_n, M, N, K,
                                         BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)  # fmt: skip
            tile_c += num_programs
            pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
            _store_ptr(out_ptr, _silu_mul(acc_g, acc_u, dtype), pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    else:
        pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
        acc_g, acc_u = _mainloop_ptr(x_ptr, g_ptr, u_ptr, pid_m, pid_n, M, N, K,
                                     BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)  # fmt: skip
        _store_ptr(out_ptr, _silu_mul(acc_g, acc_u, dtype), pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"gemm_silu_mul needs x [M, K] and weight [2N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] % 2 != 0:
        raise ValueError(f"weight must stack gate and up rows (an even row count), got {weight.shape[0]}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} columns but weight has K={weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gemm_silu_mul supports fp16, bf16 and fp32, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(
            f"gemm_silu_mul needs contiguous x and weight, got strides {x.stride()} and {weight.stride()}"
        )


def _tma_device(device: torch.device) -> bool:
    # the interpreter runs descriptors on the CPU; on a GPU they need Hopper's copy engine
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (9, 0)


def tma_usable(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these tensors: 16-byte aligned bases (the up half's too) and
    row strides, on a device with the copy engine (or the interpreter)."""
    n, k, size = out.shape[1], x.shape[1], x.element_size()
    if (k * size) % 16 or (n * size) % 16:
        return False
    bases = (x.data_ptr(), weight.data_ptr(), weight.data_ptr() + n * k * size, out.data_ptr())
    return all(b % 16 == 0 for b in bases) and _tma_device(x.device)


def gemm_silu_mul(
    x: torch.Tensor, weight: torch.Tensor, config: GemmSiluMulConfig | None = None
) -> torch.Tensor:
    """x [M, K], weight [2N, K] (gate rows 0..N-1, then up rows N..2N-1), both contiguous and of one
    dtype -> silu(x @ weight[:N].T) * (x @ weight[N:].T), [M, N] in x's dtype (fp32 accumulation)."""
    _check(x, weight)
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # silu(0) * 0
        return out.zero_()
    cfg = config or default_config(m, n, k, x.dtype)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = min(tiles, num_sms(x.device)) if cfg.persistent else tiles
    meta = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PERSISTENT=cfg.persistent, FLATTEN=cfg.flatten, PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    if cfg.tma and tma_usable(x, weight, out):
        bk, bn = [cfg.block_m, cfg.block_k], [cfg.block_n, cfg.block_k]
        x_desc = TensorDescriptor(x, [m, k], [k, 1], bk)
        # two descriptors over the halves, so each clips (zero-fills) at its own N rows
        g_desc = TensorDescriptor(weight, [n, k], [k, 1], bn)
        u_desc = TensorDescriptor(weight[n:], [n, k], [k, 1], bn)
        o_desc = TensorDescriptor(out, [m, n], [n, 1], [cfg.block_m, cfg.block_n])
        _gemm_silu_mul_tma_kernel[(programs,)](x_desc, g_desc, u_desc, o_desc, m, n, k, programs, **meta)
    else:
        _gemm_silu_mul_ptr_kernel[(programs,)](
            x, weight, weight[n:], out, m, n, k, programs, EVEN_K=k % cfg.block_k == 0, **meta
        )
    return out


def gemm_silu_mul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfused path in plain torch: the gate|up GEMM, then SiLU-and-mul."""
    g, u = F.linear(x, weight).chunk(2, -1)
    return F.silu(g) * u
