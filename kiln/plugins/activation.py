"""SiLU-and-mul: the gated activation of Llama-style MLPs."""

from __future__ import annotations

import torch.nn.functional as F

from kiln.plugins.registry import Plugin, plugin


@plugin("silu_and_mul", kind="silu_and_mul")
class SiluAndMul(Plugin):
    """x [T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""

    schema = "(Tensor x) -> Tensor"

    def shape_dtype_inference(self, x):
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    def forward(self, x):
        from kiln.plugins.triton.activation import silu_and_mul

        return silu_and_mul(x)

    def reference(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
