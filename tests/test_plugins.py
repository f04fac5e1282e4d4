"""The plugin mechanism: registration, selection by kind, validation, opcheck of every reference."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.plugins import DEFAULT_PLUGINS, Plugin, PluginSet, get_plugin, plugin, registered_plugins
from kiln.plugins.norms import rms_norm_reference

CALLS = {"n": 0}
WRAP_TRITON_ON: list[bool] = []


@plugin("counting_rms_norm", kind="rms_norm")
class CountingRmsNorm(Plugin):
    """A user plugin: the reference RMSNorm computed differently, counting its calls."""

    schema = "(Tensor x, Tensor weight, float eps) -> Tensor"

    def shape_dtype_inference(self, x, weight, eps):
        return torch.empty_like(x)

    def forward(self, x, weight, eps):
        CALLS["n"] += 1
        WRAP_TRITON_ON.append(torch._library.triton.is_wrap_triton_enabled())
        xf = x.float()
        return weight * (xf / xf.pow(2).mean(-1, keepdim=True).add(eps).sqrt()).to(x.dtype)

    reference = forward


def test_user_plugin_selected_by_kind_gives_same_tokens(tiny_model):
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(path, max_batch_size=4, max_num_tokens=64, max_seq_len=128) as base:
        ref = base.generate([[1, 2, 3, 4]], sp, use_tqdm=False)[0].outputs[0].token_ids
    before = CALLS["n"]
    with LLM(path, max_batch_size=4, max_num_tokens=64, max_seq_len=128,
             plugins={"rms_norm": "counting_rms_norm"}) as llm:  # fmt: skip
        got = llm.generate([[1, 2, 3, 4]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert got == ref
    assert CALLS["n"] > before


def test_linear_plugin_is_called_only_when_chosen(tiny_model):
    """The default linear (cuBLAS) is called directly; another linear plugin goes through its op."""
    path = tiny_model("LlamaForCausalLM", tokenizer=True)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for choice in (None, "skinny_linear"):
        plugins = None if choice is None else {"linear": choice}
        with LLM(path, max_batch_size=4, max_num_tokens=64, max_seq_len=128, plugins=plugins,
                 executor="thread") as llm:  # fmt: skip
            model = llm._executor._core.engine.model
            ops = {m.linear_op for m in model.modules() if hasattr(m, "linear_op")}
            assert ops == ({None} if choice is None else {get_plugin(choice).reference_op})
            outs[choice] = llm.generate([[1, 2, 3, 4]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert outs[None] == outs["skinny_linear"]


def test_fused_projection_kinds_are_used_only_when_chosen(tiny_model):
    """By default the norm, SiLU-and-mul and projections run apart; chosen fused plugins take them
    together (their references here: the same math) and give the same tokens."""
    path = tiny_model("Qwen2ForCausalLM", tokenizer=True)  # q|k|v biases: added after the fused op
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fused = {"add_rms_norm_linear": "skinny_add_rms_norm_linear", "silu_mul_linear": "skinny_silu_mul_linear"}
    epilogue = {"linear_silu_mul": "gemm_silu_mul"}  # gate|up and SiLU-and-mul in one op
    outs = {}
    for name, plugins in (("apart", None), ("fused", fused), ("epilogue", epilogue)):
        with LLM(path, max_batch_size=4, max_num_tokens=64, max_seq_len=128, plugins=plugins,
                 executor="thread") as llm:  # fmt: skip
            layers = llm._executor._core.engine.model.model.layers
            assert all((layer.norm_linear_op is None) == (name != "fused") for layer in layers)
            assert all((layer.mlp.silu_mul_linear_op is None) == (name != "fused") for layer in layers)
            assert all((layer.mlp.linear_silu_mul_op is None) == (name != "epilogue") for layer in layers)
            chosen = llm.engine_info["plugins"]  # every kind's plugin, as reports record it
            assert chosen["linear_silu_mul"] == ("gemm_silu_mul" if name == "epilogue" else "linear_silu_mul")
            assert chosen["add_rms_norm_linear"] == (fused if name == "fused" else {}).get(
                "add_rms_norm_linear", "add_rms_norm_linear"
            )
            outs[name] = llm.generate([[1, 2, 3, 4], [5, 6]], sp, use_tqdm=False)
    tokens = {name: [o.outputs[0].token_ids for o in out] for name, out in outs.items()}
    assert tokens["apart"] == tokens["fused"] == tokens["epilogue"]


def test_linear_silu_mul_is_refused_for_an_mlp_with_biases():
    """A gated MLP with biases keeps gate|up and SiLU-and-mul apart: the fused op has no bias."""
    from kiln.layers.mlp import GatedMLP

    plugins = PluginSet("reference", {"linear_silu_mul": "gemm_silu_mul"})
    assert GatedMLP(16, 32, bias=False, plugins=plugins).linear_silu_mul_op is not None
    mlp = GatedMLP(16, 32, bias=True, plugins=plugins)
    assert mlp.linear_silu_mul_op is None
    for param in mlp.parameters():  # built without initialising its weights
        torch.nn.init.normal_(param)
    x = torch.randn(3, 16)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), mlp.down_proj(torch.nn.functional.silu(gate) * up))


def test_the_gpu_takes_the_fused_gate_up_gemm_by_default():
    """On the forward backend linear_silu_mul defaults to gemm_silu_mul, and the MLP routes through its
    op; the reference backend, an explicit choice and a chosen SiLU-and-mul prologue of the down
    projection (the same op fused the other way) keep theirs."""
    from kiln.layers.mlp import GatedMLP
    from kiln.plugins import FORWARD_DEFAULT_PLUGINS

    assert FORWARD_DEFAULT_PLUGINS == {"linear_silu_mul": "gemm_silu_mul"}
    cases = [
        ("forward", None, "gemm_silu_mul"),
        ("reference", None, "linear_silu_mul"),
        ("forward", {"linear_silu_mul": "linear_silu_mul"}, "linear_silu_mul"),
        ("forward", {"silu_mul_linear": "gemv_silu_mul_linear"}, "linear_silu_mul"),
        ("forward", {"silu_mul_linear": ("silu_mul_linear", "forward")}, "gemm_silu_mul"),  # its default
    ]
    for backend, overrides, expected in cases:
        plugins = PluginSet(backend, overrides)
        assert plugins.choice["linear_silu_mul"][0] == expected, (backend, overrides)
        mlp = GatedMLP(16, 32, bias=False, plugins=plugins)
        assert (mlp.linear_silu_mul_op is not None) == (expected == "gemm_silu_mul")


def test_the_fused_gate_up_gemm_runs_only_where_it_was_measured_to_win(monkeypatch):
    """From GEMM_SILU_MUL_MIN_ROWS rows (not a 2,048-token prompt, not a decode batch), at hidden sizes
    from GEMM_SILU_MUL_MIN_HIDDEN, one dtype, a contiguous weight, on Hopper (or the interpreter)."""
    from kiln.plugins import linear

    rows, hidden, bf16 = linear.GEMM_SILU_MUL_MIN_ROWS, linear.GEMM_SILU_MUL_MIN_HIDDEN, torch.bfloat16
    assert (rows, hidden) == (4096, 2048)
    wins = linear._gemm_silu_mul_wins
    x, weight = torch.empty(rows, hidden, dtype=bf16), torch.empty(64, hidden, dtype=bf16)
    assert wins(x, weight)
    assert not wins(x[:2048], weight)
    assert not wins(x[:, :1024].contiguous(), torch.empty(64, 1024, dtype=bf16))  # a small model
    assert not wins(x.float(), weight)
    assert not wins(x, torch.empty(hidden, 64, dtype=bf16).t())  # not contiguous
    for capability, hopper in (((8, 0), False), ((9, 0), True), ((10, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert linear._hopper.__wrapped__(0) == hopper


def test_forward_launches_triton_kernels_directly():
    """Inside a plugin's op, wrap_triton launches go straight to the kernel: its tracing path costs
    ~0.1-0.2 ms of host time per launch and keeps each launch's arguments in a global table."""
    WRAP_TRITON_ON.clear()
    get_plugin("counting_rms_norm").forward_op(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert WRAP_TRITON_ON == [False]


def test_plugin_set_validates_choices(tiny_model):
    with pytest.raises(ValueError, match="unknown plugin kinds"):
        PluginSet("reference", {"attn": "paged_attention"})
    with pytest.raises(ValueError, match="is of kind 'rms_norm', not 'attention'"):
        PluginSet("reference", {"attention": "rms_norm"})
    kinds = r"\['paged_attention', 'paged_attention_sdpa'\]"
    with pytest.raises(ValueError, match=r"no plugin named 'nope'; plugins of kind 'attention': " + kinds):
        PluginSet("reference", {"attention": "nope"})
    with pytest.raises(ValueError, match="no plugin named 'nope'"):
        LLM(tiny_model("LlamaForCausalLM"), plugins={"linear": "nope"})
    with pytest.raises(ValueError, match="plugin backend must be one of"):
        PluginSet("cuda")
    ps = PluginSet("reference", {"silu_and_mul": ("silu_and_mul", "reference")})
    assert ps.choice["silu_and_mul"] == ("silu_and_mul", "reference")


def test_registration_rejects_schema_mismatch_and_duplicates():
    with pytest.raises(ValueError, match="plugins of this kind must have schema"):

        @plugin("bad_norm", kind="rms_norm")
        class Bad(Plugin):
            schema = "(Tensor x, Tensor weight) -> Tensor"

    with pytest.raises(ValueError, match="already registered"):

        @plugin("rms_norm", kind="rms_norm")
        class Again(Plugin):
            schema = "(Tensor x, Tensor weight, float eps) -> Tensor"


def test_every_builtin_kind_has_a_plugin():
    regs = registered_plugins()
    for kind, name in DEFAULT_PLUGINS.items():
        assert regs[name].plugin.kind == kind


def test_reference_ops_pass_opcheck():
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    w = torch.randn(64)
    torch.library.opcheck(get_plugin("rms_norm").reference_op, (x, w, 1e-6))
    torch.library.opcheck(get_plugin("fused_add_rms_norm").reference_op, (x, torch.randn_like(x), w, 1e-6))
    torch.library.opcheck(get_plugin("silu_and_mul").reference_op, (torch.randn(3, 64),))
    kc, vc = torch.randn(6, 8, 2, 32), torch.randn(6, 8, 2, 32)
    q, k, v = torch.randn(7, 4, 32), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    pos = torch.tensor([0, 1, 2, 3, 4, 9, 10])
    slots = torch.tensor([8, 9, 10, 11, 12, -1, 17])
    torch.library.opcheck(
        get_plugin("rope_kv_write").reference_op, (q, k, v, pos, torch.randn(64, 32), kc, vc, slots)
    )
    bt = torch.tensor([[1, 2, 0], [3, 4, 5]], dtype=torch.int32)
    args = (
        q,
        kc,
        vc,
        bt,
        torch.tensor([5, 20], dtype=torch.int32),
        torch.tensor([0, 5, 7], dtype=torch.int32),
    )
    torch.library.opcheck(get_plugin("paged_attention").reference_op, (*args, 5, 20, 0.17, 0))
    assert torch.equal(get_plugin("rms_norm").reference_op(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_registration_requires_all_three_implementations():
    with pytest.raises(ValueError, match="must implement reference"):

        @plugin("half_done_norm", kind="rms_norm")
        class HalfDone(Plugin):
            schema = "(Tensor x, Tensor weight, float eps) -> Tensor"

            def shape_dtype_inference(self, x, weight, eps):
                return torch.empty_like(x)

            def forward(self, x, weight, eps):
                return x


def test_writer_is_the_chosen_forward_plugins_forward_into():
    assert PluginSet("reference").writer("attention") is None  # references return their result
    forward = PluginSet("forward", {"attention": "paged_attention"})
    assert forward.writer("attention") is get_plugin("paged_attention").into_impl is not None
    assert forward.writer("rms_norm") is None  # a plugin without forward_into
    with pytest.raises(ValueError, match="no plugin kind"):
        forward.writer("attn")


def test_default_linear_takes_one_row_through_its_op_only_on_the_triton_backend_and_without_bias():
    from kiln.layers.linear import Linear

    assert Linear(8, 4, plugins=PluginSet("forward")).one_row_op is not None  # the GEMV for one row
    assert Linear(8, 4, plugins=PluginSet("reference")).one_row_op is None
    # F.linear adds a bias before its one rounding: biased projections stay on it at every row count
    assert Linear(8, 4, bias=True, plugins=PluginSet("forward")).one_row_op is None
    chosen = Linear(8, 4, plugins=PluginSet("forward", {"linear": "cublas_linear"}))
    assert chosen.one_row_op is None and chosen.linear_op is not None


def test_gemm_silu_mul_takes_the_ops_apart_for_a_weight_it_cannot_read(monkeypatch):
    """A weight whose rows are not contiguous (a column slice) goes to cuBLAS + SiLU-and-mul, not to the
    kernel, which would refuse it."""
    from kiln.plugins import linear as linear_mod

    monkeypatch.setattr(linear_mod, "GEMM_SILU_MUL_MIN_ROWS", 2)
    x = torch.randn(4, 16)
    weight = torch.randn(32, 24)[:, :16]  # rows of 16 with a stride of 24
    op = get_plugin("gemm_silu_mul").forward_op
    gate, up = torch.nn.functional.linear(x, weight).chunk(2, dim=-1)
    torch.testing.assert_close(op(x, weight), torch.nn.functional.silu(gate) * up)
