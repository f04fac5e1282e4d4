"""Linear layers: cuBLAS GEMMs through ``torch.nn.functional.linear``, or the chosen ``linear`` plugin.

Projections that read the same input are fused into one weight at load time (q|k|v, gate|up):
``MergedLinear`` records the row ranges of its parts so the loader knows where each checkpoint
tensor goes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.plugins import PluginSet


def linear_ops(plugins: PluginSet | None) -> tuple[Callable | None, Callable | None]:
    """(op for every input, op for one-row inputs): the chosen ``linear`` plugin's op for every input
    when it is not the default; else the default's op for one row on the Triton backend only."""
    if plugins is None:
        return None, None
    if plugins.overridden("linear"):
        return plugins.linear, None
    return None, plugins.linear if plugins.choice["linear"][1] == "forward" else None


def one_row(x: torch.Tensor) -> bool:
    """Whether x [T, in] goes to the default linear's op, which itself picks the GEMV for one row and
    cuBLAS otherwise. Eagerly that is decided here, so several rows call cuBLAS without the op. In a
    compiled graph every input goes to the op: the token dimension is unbacked there (one graph for
    every step size), so the graph cannot branch on it, and the op decides at run time."""
    return torch.compiler.is_compiling() or x.shape[0] == 1


class Linear(nn.Module):
    """y = x @ W^T (+ b). weight [out, in], bias [out].

    With ``plugins`` choosing a ``linear`` plugin other than the default, the product goes through
    that plugin's op. The default is cuBLAS, called directly without a custom-op dispatch, except for
    one row on the Triton backend, which goes through the default's op (its GEMV); see ``one_row``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, plugins: PluginSet | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.linear_op, self.one_row_op = linear_ops(plugins)
        if bias:  # F.linear adds the bias before its one rounding; the op would round twice
            self.one_row_op = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_op is not None:
            return self.add_bias(self.linear_op(x, self.weight))
        if self.one_row_op is not None and one_row(x):
            return self.add_bias(self.one_row_op(x, self.weight))
        return F.linear(x, self.weight, self.bias)  # [T, in] -> [T, out]

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """y + b when the layer has a bias (a fused op that did the product leaves the bias to the layer)."""
        return y if self.bias is None else y + self.bias


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dimension.

    ``parts`` names the checkpoint projections in order with their output sizes, e.g.
    (("q_proj", 512), ("k_proj", 128), ("v_proj", 128)).
    """

    def __init__(
        self,
        in_features: int,
        parts: tuple[tuple[str, int], ...],
        bias: bool = False,
        plugins: PluginSet | None = None,
    ) -> None:
        super().__init__(in_features, sum(size for _, size in parts), bias, plugins)
        self.parts = parts

    def part_rows(self, name: str) -> tuple[int, int]:
        """(first row, number of rows) of part ``name`` in the fused weight."""
        start = 0
        for part, size in self.parts:
            if part == name:
                return start, size
            start += size
        names = [p for p, _ in self.parts]
        raise KeyError(f"{name!r} is not a part of this fused projection; parts: {names}")

    def split_sizes(self) -> list[int]:
        return [size for _, size in self.parts]
