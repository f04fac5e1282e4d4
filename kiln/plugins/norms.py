"""RMSNorm, alone and fused with the residual add."""

from __future__ import annotations

import torch

from kiln.plugins.registry import Plugin, plugin


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Matches HF LlamaRMSNorm: normalise in float32, cast back, then scale by the weight.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@plugin("rms_norm", kind="rms_norm")
class RmsNorm(Plugin):
    """x [..., H], weight [H] -> [..., H]."""

    schema = "(Tensor x, Tensor weight, float eps) -> Tensor"

    def shape_dtype_inference(self, x, weight, eps):
        return torch.empty_like(x)

    def forward(self, x, weight, eps):
        from kiln.plugins.triton.norms import rms_norm

        return rms_norm(x, weight, eps)

    def reference(self, x, weight, eps):
        return rms_norm_reference(x, weight, eps)


@plugin("fused_add_rms_norm", kind="fused_add_rms_norm")
class FusedAddRmsNorm(Plugin):
    """residual_out = x + residual; out = rms_norm(residual_out). Returns (out, residual_out)."""

    schema = "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"

    def shape_dtype_inference(self, x, residual, weight, eps):
        return torch.empty_like(x), torch.empty_like(x)

    def forward(self, x, residual, weight, eps):
        from kiln.plugins.triton.norms import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, weight, eps)

    def reference(self, x, residual, weight, eps):
        residual_out = x + residual
        return rms_norm_reference(residual_out, weight, eps), residual_out
