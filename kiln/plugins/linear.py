"""Linear projections (y = x @ W^T) as a plugin kind, so a GEMM kernel can replace cuBLAS where it wins.

``linear`` (the default) is cuBLAS through ``torch.nn.functional.linear``, except for a single row
(decode at batch 1), which goes to a matrix-vector kernel (``plugins/triton/gemv.py``: 1.08-1.34x
cuBLAS on every Llama-1B/8B projection on an H100, benchmarks/RESULTS.md). Eager layers call
cuBLAS directly for several rows and the op for one row (on the Triton backend); compiled layers,
whose token count is symbolic, call the op for every input and it picks at run time
(``kiln.layers.linear.one_row``); projections with a bias stay on ``F.linear``. ``cublas_linear`` is
cuBLAS for every input.
``skinny_linear`` runs inputs of at most ``skinny_gemm.MAX_ROWS`` rows through the skinny GEMM
(``plugins/triton/skinny_gemm.py``) and everything else through cuBLAS. Biases are added by the
layer, outside the op.

Two kinds fuse the op before a projection into it: ``add_rms_norm_linear`` (the residual add and
RMSNorm before q|k|v and gate|up) and ``silu_mul_linear`` (SiLU-and-mul before down). Their defaults
are the ops apart, and layers then call the ops apart directly, without the fused kind's op; the
``skinny_`` plugins apply the first op as the skinny GEMM's prologue at up to ``MAX_ROWS`` rows, the
``gemv_`` ones as the GEMV's prologue at one row. One kind fuses the op after a projection:
``linear_silu_mul`` (the gate|up projection and SiLU-and-mul); ``gemm_silu_mul`` applies it in a
Triton GEMM's epilogue for large steps on Hopper (``GEMM_SILU_MUL_MIN_ROWS``: long prefills and mixed
steps), so the [T, 2I] projection output never goes through memory; it is the default on the GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.plugins.norms import rms_norm_reference
from kiln.plugins.registry import Plugin, plugin


class _Linear(Plugin):
    """x [T, K], weight [N, K] -> x @ weight^T, [T, N]."""

    schema = "(Tensor x, Tensor weight) -> Tensor"

    def shape_dtype_inference(self, x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def reference(self, x, weight):
        return F.linear(x, weight)


@plugin("linear", kind="linear")
class GemvOrCublasLinear(_Linear):
    """cuBLAS, and the GEMV for one row."""

    def forward(self, x, weight):
        return _cublas_or_gemv(x, weight)


@plugin("cublas_linear", kind="linear")
class CublasLinear(_Linear):
    def forward(self, x, weight):
        return F.linear(x, weight)


@plugin("skinny_linear", kind="linear")
class SkinnyLinear(_Linear):
    def forward(self, x, weight):
        if not _skinny_rows(x, weight):
            return F.linear(x, weight)
        from kiln.plugins.triton.skinny_gemm import skinny_gemm

        return skinny_gemm(x.contiguous(), weight)


def _cublas_or_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not _gemv_serves(x, weight):
        return F.linear(x, weight)
    from kiln.plugins.triton.gemv import gemv

    return gemv(x.contiguous(), weight)


def _gemv_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV serves this input: one row, of the weight's dtype (the caller makes x contiguous)."""
    return x.dim() == 2 and x.shape[0] == 1 and weight.stride(1) == 1 and x.dtype == weight.dtype


def _skinny_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the skinny GEMM serves this input (few rows; x is made contiguous by the caller)."""
    from kiln.plugins.triton.skinny_gemm import MAX_ROWS

    return x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and weight.stride(1) == 1


@plugin("add_rms_norm_linear", kind="add_rms_norm_linear")
class AddRmsNormLinear(Plugin):
    """(rms_norm(x + residual) @ weight^T, x + residual): ``fused_add_rms_norm``, then cuBLAS."""

    schema = "(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight) -> (Tensor, Tensor)"

    def shape_dtype_inference(self, x, residual, norm_weight, eps, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty_like(x)

    def forward(self, x, residual, norm_weight, eps, weight):
        from kiln.plugins.triton.norms import fused_add_rms_norm

        normed, residual_out = fused_add_rms_norm(x, residual, norm_weight, eps)
        return F.linear(normed, weight), residual_out

    def reference(self, x, residual, norm_weight, eps, weight):
        residual_out = x + residual
        return F.linear(rms_norm_reference(residual_out, norm_weight, eps), weight), residual_out


@plugin("skinny_add_rms_norm_linear", kind="add_rms_norm_linear")
class SkinnyAddRmsNormLinear(AddRmsNormLinear):
    """The norm as the skinny GEMM's prologue at up to ``MAX_ROWS`` rows; the ops apart beyond."""

    def forward(self, x, residual, norm_weight, eps, weight):
        if not _skinny_rows(x, weight):
            return super().forward(x, residual, norm_weight, eps, weight)
        from kiln.plugins.triton.skinny_gemm import add_rms_norm_skinny_gemm

        return add_rms_norm_skinny_gemm(x.contiguous(), residual.contiguous(), norm_weight, eps, weight)


@plugin("gemv_add_rms_norm_linear", kind="add_rms_norm_linear")
class GemvAddRmsNormLinear(AddRmsNormLinear):
    """The residual add and norm as the GEMV's prologue at one row; the ops apart beyond."""

    def forward(self, x, residual, norm_weight, eps, weight):
        if not _gemv_serves(x, weight):
            return super().forward(x, residual, norm_weight, eps, weight)
        from kiln.plugins.triton.gemv import add_rms_norm_gemv

        return add_rms_norm_gemv(x.contiguous(), residual.contiguous(), norm_weight, eps, weight)


@plugin("silu_mul_linear", kind="silu_mul_linear")
class SiluMulLinear(Plugin):
    """gate_up [T, 2I] (gate | up) -> (silu(gate) * up) @ weight^T: ``silu_and_mul``, then cuBLAS."""

    schema = "(Tensor gate_up, Tensor weight) -> Tensor"

    def shape_dtype_inference(self, gate_up, weight):
        return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])

    def forward(self, gate_up, weight):
        from kiln.plugins.triton.activation import silu_and_mul

        return F.linear(silu_and_mul(gate_up), weight)

    def reference(self, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight)


@plugin("skinny_silu_mul_linear", kind="silu_mul_linear")
class SkinnySiluMulLinear(SiluMulLinear):
    """SiLU-and-mul as the skinny GEMM's prologue at up to ``MAX_ROWS`` rows; the ops apart beyond."""

    def forward(self, gate_up, weight):
        if not _skinny_rows(gate_up, weight):
            return super().forward(gate_up, weight)
        from kiln.plugins.triton.skinny_gemm import silu_mul_skinny_gemm

        return silu_mul_skinny_gemm(gate_up.contiguous(), weight)


@plugin("gemv_silu_mul_linear", kind="silu_mul_linear")
class GemvSiluMulLinear(SiluMulLinear):
    """SiLU-and-mul as the GEMV's prologue at one row; the ops apart beyond."""

    def forward(self, gate_up, weight):
        if not _gemv_serves(gate_up, weight):
            return super().forward(gate_up, weight)
        from kiln.plugins.triton.gemv import silu_mul_gemv

        return silu_mul_gemv(gate_up.contiguous(), weight)


# Where the fused gate|up GEMM was measured to beat cuBLAS + silu_and_mul (benchmarks/RESULTS.md,
# 2026-11-28, H100 and H200, Llama 1B and 8B): 1.01-1.07x from 4,096 rows, 0.89-1.05x at 1,024-2,048
# (so a 2,048-token prompt keeps cuBLAS), on Hopper, at hidden sizes of 2,048 and more. Elsewhere
# (decode batches, small models, other GPUs, whose pointer-load path is unmeasured) the ops run apart.
GEMM_SILU_MUL_MIN_ROWS = 4096
GEMM_SILU_MUL_MIN_HIDDEN = 2048


@plugin("linear_silu_mul", kind="linear_silu_mul")
class LinearSiluMul(Plugin):
    """x [T, K], weight [2I, K] (gate | up) -> silu(x @ gate^T) * (x @ up^T), [T, I]: the default
    linear (cuBLAS, the GEMV at one row), then ``silu_and_mul``."""

    schema = "(Tensor x, Tensor weight) -> Tensor"

    def shape_dtype_inference(self, x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)

    def forward(self, x, weight):
        from kiln.plugins.triton.activation import silu_and_mul

        return silu_and_mul(_cublas_or_gemv(x, weight))

    def reference(self, x, weight):
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up


@plugin("gemm_silu_mul", kind="linear_silu_mul")
class GemmSiluMul(LinearSiluMul):
    """SiLU-and-mul in a Triton GEMM's epilogue where it wins (``_gemm_silu_mul_wins``); the ops apart
    elsewhere. The default on the GPU (``FORWARD_DEFAULT_PLUGINS``)."""

    def forward(self, x, weight):
        if not _gemm_silu_mul_wins(x, weight):
            return super().forward(x, weight)
        from kiln.plugins.triton.gemm_silu_mul import gemm_silu_mul

        return gemm_silu_mul(x.contiguous(), weight)


def _gemm_silu_mul_wins(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dim() == 2
        and x.shape[0] >= GEMM_SILU_MUL_MIN_ROWS
        and x.shape[1] >= GEMM_SILU_MUL_MIN_HIDDEN
        and weight.is_contiguous()  # the kernel's TMA and pointer paths both read rows of K
        and x.dtype == weight.dtype
        and (not x.is_cuda or _hopper(x.device.index))  # on the CPU: Triton's interpreter (tests)
    )


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] == 9
