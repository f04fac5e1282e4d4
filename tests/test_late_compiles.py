"""The watch on Triton compilations after start-up."""

from __future__ import annotations

import logging

import pytest

from kiln.engine.late_compiles import LateCompileWatch


def test_counts_only_once_armed_chains_and_restores_the_previous_hook(caplog):
    # Triton is imported here, not at collection: the kernel tests set TRITON_INTERPRET=1 when they
    # are collected, and Triton's own jit functions must be made after that.
    knobs = pytest.importorskip("triton").knobs
    original = knobs.runtime.jit_post_compile_hook
    seen = []

    def previous(**kwargs):
        seen.append(kwargs["repr"])

    knobs.runtime.jit_post_compile_hook = previous
    try:
        watch = LateCompileWatch()
        hook = knobs.runtime.jit_post_compile_hook
        hook(repr="_kernel_a[num_warps=4](x: *fp16)")  # during start-up: not counted
        watch.arm()
        with caplog.at_level(logging.WARNING, logger="kiln"):
            hook(repr="_kernel_b[num_warps=4](x: *fp16)")
        assert watch.count == 1 and watch.names == ["_kernel_b[num_warps=4] constexprs() key=?"]
        assert "_kernel_b" in caplog.text and "after start-up" in caplog.text
        assert seen == ["_kernel_a[num_warps=4](x: *fp16)", "_kernel_b[num_warps=4](x: *fp16)"]
        watch.close()
        assert knobs.runtime.jit_post_compile_hook is previous
    finally:
        knobs.runtime.jit_post_compile_hook = original


def test_a_late_compile_is_named_by_its_constexprs_and_specialisation_key():
    from types import SimpleNamespace

    from kiln.engine.late_compiles import describe

    params = [SimpleNamespace(name="x_ptr"), SimpleNamespace(name="n"), SimpleNamespace(name="BLOCK")]
    name = describe(
        dict(
            repr="_kernel[num_warps=8, num_stages=3](x_ptr: *bf16, n: i32, BLOCK: constexpr)",
            fn=SimpleNamespace(jit_function=SimpleNamespace(params=params)),
            compile={"constants": {(2,): 128}, "key": (("*bf16", "D"), ("i32", "1"))},
        )
    )
    assert (
        name == "_kernel[num_warps=8, num_stages=3] constexprs(BLOCK=128) key=(('*bf16', 'D'), ('i32', '1'))"
    )
