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

from kiln.engine.decode_inputs import _decode_inputs_kernel
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
    "rows_ptr": "*i64",
    "prev_tokens_ptr": "*i64",
    "block_table_ptr": "*i32",
    "ids_ptr": "*i64",
    "slot_mapping_ptr": "*i64",
    "tables_ptr": "*i32",
}
FLOAT = {"eps", "scale_log2"}
_ATTENTION = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, TOKENS_PER_TILE=4, PAGE_SIZE=32,
                  USE_SEARCH=True, SPLIT=True, PRECISION="tf32")  # fmt: skip
# every constexpr branch that moves memory differently; the GEMV is the only kernel that may load (its
# weight tiles, the only loads with an evict-first hint in gemv.py) before it waits
KERNELS = {
    "gemv": (
        _gemv_kernel,
        dict(BLOCK_N=1, BLOCK_K=512, EVEN_N=True, EVEN_K=True, PROLOGUE=0, PRE_K=512, EVEN_PRE=True),
    ),
    "gemv_ragged": (
        _gemv_kernel,
        dict(BLOCK_N=4, BLOCK_K=512, EVEN_N=False, EVEN_K=False, PROLOGUE=0, PRE_K=512, EVEN_PRE=True),
    ),
    "gemv_norm": (
        _gemv_kernel,
        dict(BLOCK_N=1, BLOCK_K=512, EVEN_N=True, EVEN_K=True, PROLOGUE=1, PRE_K=512, EVEN_PRE=True),
    ),
    "gemv_silu": (
        _gemv_kernel,
        dict(BLOCK_N=8, BLOCK_K=1024, EVEN_N=True, EVEN_K=False, PROLOGUE=2, PRE_K=1024, EVEN_PRE=True),
    ),
    # several tiles before the wait (the default prefetch; the kinds above fetch one, KILN_GEMV_PREFETCH_K=0),
    # masked past K, with the norm's prologue
    "gemv_prefetch": (
        _gemv_kernel,
        dict(BLOCK_N=1, BLOCK_K=512, EVEN_N=True, EVEN_K=False, PROLOGUE=1, PRE_K=4096, EVEN_PRE=False),
    ),
    "rms_norm": (_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, SINGLE_TILE=True)),
    "rms_norm_tiled": (_rms_norm_kernel, dict(HAS_RESIDUAL=False, BLOCK=1024, SINGLE_TILE=False)),
    "silu_and_mul": (_silu_and_mul_kernel, dict(BLOCK=1024)),
    "rope_kv_write": (_rope_kv_write_kernel, dict(HALF=64, HALF_P2=64, BLOCK_H=8)),
    "attention": (_attention_tile_kernel, _ATTENTION),
    "attention_unsplit": (
        _attention_tile_kernel,
        dict(_ATTENTION, USE_SEARCH=False, SPLIT=False, BLOCK_M=64),
    ),
    "merge_splits": (_merge_splits_kernel, dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_P2=16, ONE_TOKEN=False)),
    "merge_splits_decode": (
        _merge_splits_kernel,
        dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_P2=16, ONE_TOKEN=True),
    ),
    "greedy_partial": (_greedy_partial_kernel, dict(BLOCK=1024)),
    "greedy_merge": (_greedy_merge_kernel, dict(BLOCK_C=128)),
    "decode_inputs": (_decode_inputs_kernel, dict(TOKENS_PER_BLOCK=32, BLOCK=4096)),
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


def opcode(line: str) -> str:
    """A PTX line's instruction ("" for labels, directives, braces and comments), without its predicate."""
    words = line.strip().removeprefix("{").split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words and words[0][0].isalpha() else ""


_NOT_GLOBAL = (".param", ".shared", ".local", ".const")


def is_load(op: str) -> bool:  # ld.global, ld.global.nc, ld.volatile.global, ld.acquire.gpu.global, ...
    return (op.startswith(("ld.", "ldu.")) and not any(s in op for s in _NOT_GLOBAL)) or op.startswith(
        "cp.async"
    )


def is_store(op: str) -> bool:  # st.global, st.release.gpu.global, atomics, reductions, bulk copies
    return (op.startswith("st.") and not any(s in op for s in _NOT_GLOBAL)) or op.startswith(
        ("atom.", "red.", "cp.reduce", "multimem.")
    )


def report() -> dict[str, dict[str, int]]:
    """Per kernel variant: waits, triggers, and the memory instructions and branches before the wait."""
    out = {}
    for name, (fn, consts) in KERNELS.items():
        lines = ptx_of(fn, consts, True).splitlines()
        ops = [opcode(line) for line in lines]
        wait = [i for i, op in enumerate(ops) if op == "griddepcontrol.wait;"]
        trig = [i for i, op in enumerate(ops) if op == "griddepcontrol.launch_dependents;"]
        first_wait = wait[0] if wait else len(lines)
        before = list(zip(ops[:first_wait], lines[:first_wait], strict=True))
        out[name] = dict(
            wait=len(wait),
            trigger=len(trig),
            branches_before_wait=sum(op.startswith("bra") for op, _ in before),  # a wait some paths skip
            stores_before_wait=sum(is_store(op) for op, _ in before),
            loads_before_wait=sum(is_load(op) for op, _ in before),
            weight_loads_before_wait=sum(is_load(op) and "evict_first" in line for op, line in before),
            without_pdl=sum("griddepcontrol" in line for line in ptx_of(fn, consts, False).splitlines()),
        )
    return out


if __name__ == "__main__":
    json.dump(report(), sys.stdout)
