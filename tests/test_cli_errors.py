"""Bad input to the CLI and the LLM constructor: one clear line, a non-zero exit, and (where the check is
cheap) no model loaded first. The reproductions of each case are the bad-input audit's sections B and C."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import kiln
from kiln.bench.roofline import DevicePeaks, ModelCost, serial_bound
from kiln.cli import main
from kiln.demo import demo_model_path
from kiln.plugins import PluginSet

DEMO = demo_model_path()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the engine would start or the bench would read the model: the check was late."""
    from kiln.bench import setup

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was reported")

    monkeypatch.setattr(kiln, "LLM", loaded, raising=False)
    monkeypatch.setattr(setup, "prepare_model", loaded)


def _one_line_error(capsys, command: str, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kiln {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    return err


# ---------------------------------------------------------------- B1: bench batch limits


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-batch-size", "-5"),
        ("--max-batch-size", "0"),
        ("--max-num-tokens", "0"),
        ("--max-num-tokens", "-1"),
    ],
)
def test_bench_rejects_non_positive_limits(flag, value, capsys, no_model_load):
    argv = [
        "bench",
        "throughput",
        "--model",
        DEMO,
        "--num-requests",
        "2",
        "--isl",
        "8",
        "--osl",
        "4",
        flag,
        value,
    ]
    assert main(argv) == 2
    _one_line_error(capsys, "bench", f"{flag} must be >= 1, got {value}")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("batch", [0, -5])
def test_serial_bound_refuses_a_batch_that_admits_nothing(batch):
    with open(os.path.join(DEMO, "config.json")) as f:
        cost = ModelCost.from_config(json.load(f), "float32")
    with pytest.raises(ValueError, match=f"max_batch_size must be >= 1, got {batch}"):
        serial_bound(cost, [4], [2], DevicePeaks(1e12, 1e12, "configured"), max_batch_size=batch)


# ---------------------------------------------------------------- B2: OS errors


def test_generate_without_weights_is_one_line(tmp_path, capsys):
    model = tmp_path / "noweights"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, name), model / name)
    assert main(["generate", "--model", str(model), "hi"]) == 2
    _one_line_error(capsys, "generate", "no *.safetensors weights in")


def test_os_errors_from_a_command_are_one_line(monkeypatch, capsys):
    import kiln.builder.build as build

    def exists(*args, **kwargs):
        raise FileExistsError(17, "File exists", "/some/path")

    monkeypatch.setattr(build, "build_engine", exists)
    assert main(["build", DEMO, "-o", "/some/path"]) == 2
    _one_line_error(capsys, "build", "File exists: '/some/path'")


def test_build_reports_bad_inputs_and_outputs(tmp_path, capsys):
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    assert main(["build", str(noconfig), "-o", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "build", "no config.json in")
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert main(["build", DEMO, "-o", str(afile)]) == 2
    _one_line_error(capsys, "build", "exists and is not a directory")
    assert main(["build", DEMO, "-o", str(afile / "sub")]) == 2
    _one_line_error(capsys, "build", f"cannot create the output directory {str(afile / 'sub')!r}")
    assert afile.read_text() == "x"


# ---------------------------------------------------------------- B3: devices


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x", "cpu:0"])
def test_build_names_the_allowed_devices(device, tmp_path, capsys):
    assert main(["build", DEMO, "-o", str(tmp_path / "out"), "--device", device]) == 2
    _one_line_error(capsys, "build", f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    assert not (tmp_path / "out").exists()


def test_cuda_requested_without_cuda(monkeypatch, capsys):
    import kiln.llm
    from kiln.engine_args import resolve_device

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the missing GPU was reported")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kiln.llm, "Tokenizer", loaded)
    with pytest.raises(ValueError, match=r"device 'cuda' was requested but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device(None) == "cpu"
    assert main(["generate", "--model", DEMO, "--device", "cuda", "hi"]) == 2
    _one_line_error(capsys, "generate", "use device='cpu'")
    assert main(["bench", "latency", "--model", DEMO, "--device", "cuda:0", "--isl", "8", "--osl", "4"]) == 2
    _one_line_error(capsys, "bench", "device 'cuda:0' was requested but CUDA is not available")


def test_cuda_index_beyond_the_devices(monkeypatch):
    from kiln.engine_args import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"'cuda:7' was requested but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:7")


# ---------------------------------------------------------------- B4: flags checked before the engine starts


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-tokens", "-5"], "max_tokens must be"),
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--n", "0"], "n must be an integer >= 1"),
        (["--seed", "-1"], "seed must be None or an integer"),
        (["--stop", ""], "stop strings must be non-empty"),
    ],
)
def test_generate_checks_sampling_flags_before_loading(flags, expected, capsys, no_model_load):
    assert main(["generate", "--model", DEMO, *flags, "hi"]) == 2
    _one_line_error(capsys, "generate", expected)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--temperature", "-1"], "temperature must be"),
        (["--kv-fraction", "5"], "--kv-fraction must be in (0, 1], got 5.0"),
        (["--kv-fraction", "0"], "--kv-fraction must be in (0, 1], got 0.0"),
        (["--plugin", "attention=nosuch"], "no plugin named 'nosuch'; plugins of kind 'attention'"),
        (["--plugin", "nosuchkind=x"], "unknown plugin kinds ['nosuchkind']"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
    ],
)
def test_bench_checks_flags_before_loading(flags, expected, capsys, no_model_load):
    argv = ["bench", "throughput", "--model", DEMO, "--num-requests", "2", "--isl", "8", "--osl", "4", *flags]
    assert main(argv) == 2
    _one_line_error(capsys, "bench", expected)


# ---------------------------------------------------------------- B5: messages that name the file / flag


def test_malformed_config_json_names_the_file(tmp_path, capsys):
    model = tmp_path / "badjson"
    shutil.copytree(DEMO, model)
    (model / "config.json").write_text("{bad json")
    with pytest.raises(ValueError, match=r"badjson/config.json is not valid JSON: Expecting property name"):
        kiln.LLM(str(model))
    assert main(["generate", "--model", str(model), "hi"]) == 2
    _one_line_error(capsys, "generate", "config.json is not valid JSON")


def test_missing_tokenizer_is_named(tmp_path, capsys):
    model = tmp_path / "notok"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(DEMO, name), model / name)
    with pytest.raises(
        ValueError, match=r"no tokenizer found in .*notok' \(tokenizer.json or tokenizer_config"
    ):
        kiln.LLM(str(model))
    assert main(["generate", "--model", str(model), "hi"]) == 2
    _one_line_error(capsys, "generate", "no tokenizer found in")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--kv-cache-free-memory-fraction", "2"],
            "--kv-cache-free-memory-fraction must be in (0, 1], got 2.0",
        ),
        (
            ["--kv-cache-max-tokens", "1"],
            "--kv-cache-max-tokens must be at least one KV block (32 tokens), got 1",
        ),
    ],
)
def test_serve_kv_flags_are_named(flags, expected, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import kiln.serve

    def started(*args, **kwargs):
        raise AssertionError("the server started before the bad flag was reported")

    monkeypatch.setattr(kiln.serve, "main", started)
    assert main(["serve", DEMO, *flags]) == 2
    err = _one_line_error(capsys, "serve", expected)
    assert "free_gpu_memory_fraction" not in err and " max_tokens" not in err


# ---------------------------------------------------------------- C: LLM constructor arguments


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"max_batch_size": "8"}, "max_batch_size must be an int >= 1 (or None for the default), got '8'"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an int >= 1 (or None for the default), got 2.5"),
        ({"max_batch_size": True}, "max_batch_size must be an int >= 1 (or None for the default), got True"),
        (
            {"max_num_tokens": "4096"},
            "max_num_tokens must be an int >= 1 (or None for the default), got '4096'",
        ),
        ({"max_seq_len": "512"}, "max_seq_len must be an int >= 2 (or None for the default), got '512'"),
        ({"max_seq_len": False}, "max_seq_len must be an int >= 2 (or None for the default), got False"),
        ({"device": 5}, "device must be 'cpu', 'cuda' or 'cuda:N', got 5"),
        ({"device": "cudax"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'cudax'"),
        ({"plugins": {"attention": 5}}, "the plugin for kind 'attention' must be a plugin name string"),
        ({"plugins": {"silu_mul_linear": 5}}, "the plugin for kind 'silu_mul_linear' must be a plugin name"),
        ({"plugins": {"attention": ("paged_attention", "gpu")}}, "backend one of ('forward', 'reference')"),
    ],
)
def test_llm_constructor_rejects_bad_arguments_up_front(kwargs, expected, monkeypatch):
    import kiln.llm

    def loaded(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the bad argument was reported")

    monkeypatch.setattr(kiln.llm, "Tokenizer", loaded)
    with pytest.raises(ValueError) as e:
        kiln.LLM(DEMO, **kwargs)
    assert expected in str(e.value)


def test_plugin_pairs_are_still_accepted():
    chosen = PluginSet("reference", {"attention": ("paged_attention_sdpa", "reference")}).choice
    assert chosen["attention"] == ("paged_attention_sdpa", "reference")
