"""Programmatic dependent launch (on by default on sm90+, ``KILN_PDL=0`` turns it off): when it is on,
and where each kernel waits.

The ordering rule (no store, and no load but the GEMV's weight tiles, before a kernel waits on the
kernel before it) is checked in the PTX of every decode-path kernel compiled for sm90, which needs
no GPU; the GPU test checks that tokens do not change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.plugins.triton._common import PDL_ENV, pdl, pdl_args

TESTS = Path(__file__).parent


def test_pdl_is_on_by_default_on_hopper_and_off_elsewhere(monkeypatch):
    from kiln.plugins.triton import _common

    monkeypatch.delenv(PDL_ENV, raising=False)
    assert not pdl(torch.device("cpu")) and pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv(PDL_ENV, "1")
    assert not pdl(torch.device("cpu"))  # the interpreter has no grid dependency control
    assert pdl_args(torch.device("cpu")) == {"PDL": False}
    # a CUDA device: on from compute capability 9.0 (the grid dependency instructions), off with KILN_PDL=0
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, env, expected in (((9, 0), None, True), ((10, 0), "1", True), ((8, 0), None, False),
                                      ((9, 0), "0", False)):  # fmt: skip
        monkeypatch.setattr(_common, "_cuda_capability", lambda index, c=capability: c)
        if env is None:
            monkeypatch.delenv(PDL_ENV, raising=False)
        else:
            monkeypatch.setenv(PDL_ENV, env)
        assert pdl(cuda) is expected, (capability, env)
        assert pdl_args(cuda) == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})


def test_every_decode_kernel_waits_before_it_touches_another_kernels_data():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(TESTS.parent))
    done = subprocess.run([sys.executable, str(TESTS / "pdl_ptx_report.py")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if done.returncode != 0 and "ptxas" in done.stderr:
        pytest.skip(f"Triton cannot compile for sm90 here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert len(report) == 16
    for name, r in report.items():
        assert (r["wait"], r["trigger"], r["without_pdl"]) == (1, 1, 0), name
        assert r["stores_before_wait"] == 0 and r["branches_before_wait"] == 0, name
        # only the GEMV reads before waiting, and only its weight tiles (which no kernel writes)
        expected = r["weight_loads_before_wait"] if name.startswith("gemv") else 0
        assert r["loads_before_wait"] == expected, name
    assert report["gemv"]["weight_loads_before_wait"] > 0


def test_the_ptx_check_sees_every_spelling_of_a_global_access():
    from pdl_ptx_report import is_load, is_store, opcode

    ops = {line: opcode(line) for line in (
        "ld.volatile.global.b32 %r1, [%rd1];", "@%p1 ld.global.nc.v4.b32 { %r1 }, [ %rd2 + 0 ];",
        "ld.acquire.gpu.global.b32 %r1, [%rd1];",
        "cp.async.bulk.tensor.2d.shared::cluster.global [%r1], [%rd1];",
        "st.release.gpu.global.b32 [%rd1], %r1;", "@!%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r4, %r5 };",
        "atom.global.add.f32 %f1, [%rd1], %f2;", "red.global.add.f32 [%rd1], %f2;",
        "ld.param.u64 %rd1, [k_param_0];", "st.shared.b32 [%r1], %r2;", "// ld.global in a comment",
        "$L__BB0_1:",
    )}  # fmt: skip
    loads = [line for line, op in ops.items() if is_load(op)]
    stores = [line for line, op in ops.items() if is_store(op)]
    assert len(loads) == 4 and all(line.split()[0].startswith(("ld.", "@", "cp.")) for line in loads)
    assert len(stores) == 4 and not any("shared" in line or "param" in line for line in stores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pdl_gives_the_same_tokens_on_gpu(tiny_model, monkeypatch):
    import random

    from kiln import LLM, KvCacheConfig, SamplingParams

    # intermediate 1,024: the down projection's GEMV has K tiles after the one it fetches before waiting
    path = tiny_model("Qwen3ForCausalLM", tokenizer=True, hidden_size=128, intermediate_size=1024)
    rng = random.Random(12)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(1, 90))] for _ in range(8)]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(PDL_ENV, flag)
        # CUDA graphs (where PDL launches chain) without torch.compile (no bearing on PDL; ~1 min a start-up)
        with LLM(path, dtype="float32", device="cuda", max_batch_size=16, max_num_tokens=256, max_seq_len=256,
                 kv_cache_config=KvCacheConfig(max_tokens=16384), executor="thread",
                 compile=False) as llm:  # fmt: skip
            batch = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
            alone = llm.generate(prompts[:1], sp, use_tqdm=False)[0].outputs[0].token_ids  # batch 1: the GEMV
            outs[flag] = (batch, alone)
    assert outs["1"] == outs["0"]
