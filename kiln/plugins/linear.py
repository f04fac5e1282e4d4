"""Linear projections (y = x @ W^T) as a plugin kind, so a GEMM kernel can replace cuBLAS where it wins.

``linear`` (the default) is cuBLAS through ``torch.nn.functional.linear``; layers call it directly,
not through its op, so torch.compile and CUDA graphs see a plain matmul. ``skinny_linear`` runs
inputs of at most ``skinny_gemm.MAX_ROWS`` rows (decode at small batch) through the split-K skinny GEMM
(``plugins/triton/skinny_gemm.py``) and everything else through cuBLAS. Biases are added by the
layer, outside the op.
"""

from __future__ import annotations

import torch.nn.functional as F

from kiln.plugins.registry import Plugin, plugin


class _Linear(Plugin):
    """x [T, K], weight [N, K] -> x @ weight^T, [T, N]."""

    schema = "(Tensor x, Tensor weight) -> Tensor"

    def shape_dtype_inference(self, x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def reference(self, x, weight):
        return F.linear(x, weight)


@plugin("linear", kind="linear")
class CublasLinear(_Linear):
    def forward(self, x, weight):
        return F.linear(x, weight)


@plugin("skinny_linear", kind="linear")
class SkinnyLinear(_Linear):
    def forward(self, x, weight):
        from kiln.plugins.triton.skinny_gemm import MAX_ROWS, skinny_gemm

        if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or weight.stride(1) != 1:
            return F.linear(x, weight)
        return skinny_gemm(x.contiguous(), weight)
