"""Compile the decode path's Triton kernels for an sm90 target (no GPU needed) with and without
programmatic dependent launch, and report where their PTX waits on the kernel before them.

Run in its own process with TRITON_INTERPRET=0 (``tests/test_pdl.py``): the test session runs the
kernels through Triton's interpreter, under which they cannot be compiled.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.plugins.triton.activation import _silu_and_mul_kernel
from kiln.plugins.triton.gemv import _gemv_kernel
from kiln.plugins.triton.greedy_sample import _greedy_merge_kernel, _greedy_partial_kernel
from kiln.plugins.triton.norms import _rms_norm_kernel
from kiln.plugins.triton.paged_attention import _attention_tile_kernel, _merge_splits_kernel
from kiln.plugins.triton.rope_kv_write import _rope_kv_write_kernel

# pointer types by argument name (the rest are bf16 tensors), float scalars; every other scalar is an i32
PTR = {
    "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "query_start_loc_ptr": "*i32",
    "slot_ptr": "*i64",
    "pos_ptr": "*i64",
    "cs_ptr": "*fp32",
    "part_acc_ptr": "*fp32",
    "part_ml_ptr": "*fp32",
    "part_max_ptr": "*fp32",
    "part_sum_ptr": "*fp32",
    "part_idx_ptr": "*i32",
    "tokens_ptr": "*i64",
    "packed_ptr": "*i32",
}
FLOAT = {"eps", "scale_log2"}
KERNELS = {
    "gemv": (_gemv_kernel, dict(BLOCK_N=1, BLOCK_K=512, EVEN_N=True, EVEN_K=True, PROLOGUE=1)),
    "gemv_silu": (_gemv_kernel, dict(BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=False, PROLOGUE=2)),
    "rms_norm": (_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, SINGLE_TILE=True)),
    "silu_and_mul": (_silu_and_mul_kernel, dict(BLOCK=1024)),
    "rope_kv_write": (_rope_kv_write_kernel, dict(HALF=64, HALF_P2=64, BLOCK_H=8)),
    "attention": (
        _attention_tile_kernel,
        dict(
            GROUP=4,
            HEAD_DIM=128,
            BLOCK_D=128,
            BLOCK_M=16,
            BLOCK_N=64,
            TOKENS_PER_TILE=4,
            PAGE_SIZE=32,
            USE_SEARCH=True,
            SPLIT=True,
            PRECISION="tf32",
        ),
    ),
    "merge_splits": (_merge_splits_kernel, dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_P2=16)),
    "greedy_partial": (_greedy_partial_kernel, dict(BLOCK=1024)),
    "greedy_merge": (_greedy_merge_kernel, dict(BLOCK_C=128)),
}


def ptx_of(fn, constexprs, pdl):
    consts = dict(constexprs, PDL=pdl)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = PTR.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in FLOAT else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


_STORES = ("st.global", "atom.", "red.", "cp.reduce")
_LOADS = ("ld.global", "cp.async")


def _moves_memory(line: str, kinds: tuple[str, ...]) -> bool:
    return any(k in line for k in kinds)


report = {}
for name, (fn, consts) in KERNELS.items():
    lines = ptx_of(fn, consts, True).splitlines()
    wait = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    trig = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
    before = lines[: wait[0]] if wait else lines
    report[name] = dict(
        wait=len(wait),
        trigger=len(trig),
        stores_before_wait=sum(
            _moves_memory(line, ("st.global", "atom.", "red.", "cp.reduce")) for line in before
        ),
        loads_before_wait=sum(_moves_memory(line, _LOADS) for line in before),
        weight_loads_before_wait=sum("ld.global" in line and "evict_first" in line for line in before),
        without_pdl=sum("griddepcontrol" in line for line in ptx_of(fn, consts, False).splitlines()),
    )
json.dump(report, sys.stdout)
