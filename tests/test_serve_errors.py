"""Every bad input gets the right status and one error envelope; fuzzed bodies never get a 5xx."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_harness import API_KEY, MODEL_NAME, REPO, ServerProcess

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_errors")
    args = ("--max-n", "4", "--max-logprobs", "5", "--max-body-bytes", "20000")
    with ServerProcess(tiny_model(tokenizer=True), *args, log_dir=d) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


def check_envelope(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    for leak in (str(REPO), "site-packages", "Traceback", ".py"):
        assert leak not in err["message"], err["message"]
    return err


C, CHAT = "/v1/completions", "/v1/chat/completions"

CTX = "context_length_exceeded"
UNSUP = "unsupported_parameter"


def bad(id_, body, param=None, code=None, status=400, path=C):
    """One row: ``body`` (a dict, or raw JSON bytes) to ``path`` gets ``status``, ``param`` and ``code``."""
    return pytest.param(path, body, status, param, code, id=id_)


CASES = [
    bad("malformed-json", b'{"prompt": "x",'),
    bad("body-not-object", b"[1, 2]"),
    bad("empty-body", b""),
    bad("missing-prompt", {"max_tokens": 2}, "prompt"),
    bad("missing-messages", {"max_tokens": 2}, "messages", path=CHAT),
    bad("prompt-wrong-type", {"prompt": 5}, "prompt"),
    bad("prompt-mixed-list", {"prompt": [1, "a"]}, "prompt"),
    bad("max-tokens-string", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    bad("n-bool", {"prompt": "x", "n": True}, "n"),
    bad("negative-temperature", {"prompt": "x", "temperature": -0.5}, "temperature"),
    bad("nan-temperature", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    bad("inf-top-p", b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    bad("top-p-zero", {"prompt": "x", "top_p": 0}, "top_p"),
    bad("top-p-above-one", {"prompt": "x", "top_p": 1.01}, "top_p"),
    bad("n-zero", {"prompt": "x", "n": 0}, "n"),
    bad("n-huge", {"prompt": "x", "n": 1000000}, "n"),
    bad("max-tokens-zero", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    bad("max-tokens-beyond-context", {"prompt": "x", "max_tokens": 5000}, "max_tokens", CTX),
    bad("prompt-beyond-context", {"prompt": [1] * 300}, "prompt", CTX),
    bad("chat-beyond-context", {"messages": USER, "max_completion_tokens": 300}, "messages", CTX, path=CHAT),
    bad("empty-prompt", {"prompt": ""}, "prompt"),
    bad("empty-prompt-list", {"prompt": []}, "prompt"),
    bad("empty-token-list", {"prompt": [[]]}, "prompt"),
    bad("token-id-too-big", {"prompt": [1, 320]}, "prompt"),
    bad("token-id-negative", {"prompt": [-1, 5]}, "prompt"),
    bad("empty-messages", {"messages": []}, "messages", path=CHAT),
    bad("unknown-model", {"prompt": "x", "model": "gpt-4"}, "model", "model_not_found", status=404),
    bad("unknown-model-chat", {"messages": USER, "model": "x"}, "model", "model_not_found", 404, CHAT),
    bad(
        "stream-options-without-stream",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    bad("logprobs-over-limit", {"prompt": "x", "logprobs": 6}, "logprobs"),
    bad("top-logprobs-without-logprobs", {"messages": USER, "top_logprobs": 2}, "top_logprobs", path=CHAT),
    bad("logit-bias-bad-key", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    bad("logit-bias-out-of-vocab", {"prompt": "x", "logit_bias": {"999": 1}}, "logit_bias"),
    bad("logit-bias-too-strong", {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias"),
    bad("stop-token-out-of-vocab", {"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
    bad("empty-stop-string", {"prompt": "x", "stop": [""]}, "stop"),
    bad("min-tokens-over-max", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    bad("negative-seed", {"prompt": "x", "seed": -1}, "seed"),
    bad("penalty-out-of-range", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    bad("unknown-field", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    bad("unsupported-suffix", {"prompt": "x", "suffix": "y"}, "suffix", UNSUP),
    bad("unsupported-best-of", {"prompt": "x", "best_of": 3}, "best_of", UNSUP),
    bad("unsupported-tools", {"messages": USER, "tools": [{"type": "function"}]}, "tools", UNSUP, path=CHAT),
    bad(
        "unsupported-json-mode",
        {"messages": USER, "response_format": {"type": "json_object"}},
        "response_format",
        UNSUP,
        path=CHAT,
    ),
    bad(
        "unsupported-tool-role",
        {"messages": [{"role": "tool", "content": "x"}]},
        "messages[0].role",
        UNSUP,
        path=CHAT,
    ),
    bad(
        "unsupported-image",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
        path=CHAT,
    ),
    bad("bad-role", {"messages": [{"role": "robot", "content": "x"}]}, "messages", path=CHAT),
    bad("body-too-large", {"prompt": "x" * 30000}, code="request_too_large", status=413),
]


@pytest.mark.parametrize("path, body, status, param, code", CASES)
def test_bad_input_gets_status_and_envelope(http, path, body, status, param, code):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = check_envelope(r)
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_context_length_error_uses_openai_wording(http):
    err = check_envelope(http.post(C, json={"prompt": "x", "max_tokens": 5000}))
    assert err["message"].startswith(
        "This model's maximum context length is 256 tokens. However, you requested"
    )


def test_unsupported_and_unknown_fields_say_so(http):
    err = check_envelope(http.post(CHAT, json={"messages": USER, "tools": [{"type": "function"}]}))
    assert "not supported" in err["message"] and "tools" in err["message"]
    err = check_envelope(http.post(C, json={"prompt": "x", "frobnicate": 1}))
    assert "frobnicate" in err["message"]
    # no-op values of unimplemented fields are accepted
    ok = http.post(CHAT, json={"messages": USER, "max_tokens": 1, "tool_choice": "none", "store": False})
    assert ok.status_code == 200, ok.text


def test_chat_template_from_the_tokenizer_config(tiny_model, http):
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model(tokenizer=True))
    r = http.post("/tokenize", json={"messages": USER})
    assert r.json()["tokens"] == tok.apply_chat_template(USER)


def test_model_without_chat_template_says_how_to_fix(tiny_model):
    from types import SimpleNamespace

    from kiln.serve.chat import render_chat
    from kiln.serve.config import ServeConfig
    from kiln.serve.errors import APIError
    from kiln.serve.protocol import ChatMessage
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model(tokenizer=True))
    tok.hf.chat_template = None
    state = SimpleNamespace(llm=SimpleNamespace(tokenizer=tok), config=ServeConfig())
    with pytest.raises(APIError) as e:
        render_chat([ChatMessage(role="user", content="hi")], True, state)  # type: ignore[arg-type]
    assert e.value.status == 400 and "--chat-template FILE" in e.value.message
    state = SimpleNamespace(llm=SimpleNamespace(tokenizer=tok), config=ServeConfig(chat_template="{{ 'x' }}"))
    assert render_chat([ChatMessage(role="user", content="hi")], True, state) == tok.encode("x")  # type: ignore[arg-type]


def test_other_routes_errors(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and check_envelope(r)["type"] == "not_found_error"
    r = http.get(C)
    assert r.status_code == 405 and check_envelope(r)
    r = http.get(f"/v1/models/{MODEL_NAME}-nope")
    assert r.status_code == 404 and check_envelope(r)["code"] == "model_not_found"
    r = http.post("/detokenize", json={"tokens": [1, 10**6]})
    assert r.status_code == 400 and check_envelope(r)["param"] == "tokens"
    r = http.post("/tokenize", json={"prompt": "x", "messages": USER})
    assert r.status_code == 400 and check_envelope(r)
    r = http.post(C, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "application/json" in check_envelope(r)["message"]


@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/v1/models", {}, 401),
        ("/v1/models", {"Authorization": "Bearer wrong"}, 401),
        ("/v1/models", {"Authorization": f"Basic {API_KEY}"}, 401),
        ("/v1/models", {"Authorization": f"Bearer {API_KEY}x"}, 401),
        ("/metrics", {}, 401),
        ("/openapi.json", {}, 401),
        ("/tokenize", {}, 401),
        ("/health", {}, 200),
        ("/v1/models", {"Authorization": f"Bearer {API_KEY}"}, 200),
    ],
)
def test_api_key_guards_every_route_but_health(server, path, headers, status):
    method = "POST" if path == "/tokenize" else "GET"
    r = httpx.request(
        method, server.url(path), headers=headers, json={"prompt": "x"} if method == "POST" else None
    )
    assert r.status_code == status, r.text
    if status == 401:
        err = check_envelope(r)
        assert err["code"] == "invalid_api_key" and API_KEY not in err["message"]


def test_openapi_lists_the_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    for p in (C, CHAT, "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize", "/version"):
        assert p in paths


# ---------------------------------------------------------------------------------------------- fuzzing

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 400), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
words = st.text(min_size=1, max_size=8)
SAMPLING = {
    "model": st.just(MODEL_NAME),
    "max_tokens": st.integers(1, 16),
    "n": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(words, st.lists(words, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 319), max_size=3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(st.integers(0, 319).map(str), st.floats(-100, 100), max_size=3),
    "min_tokens": st.integers(0, 3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "user": st.text(max_size=5),
}
token_ids = st.lists(st.integers(0, 319), min_size=1, max_size=20)
COMPLETION = {
    **SAMPLING,
    "prompt": st.one_of(
        st.text(min_size=1, max_size=20),
        st.lists(words, min_size=1, max_size=3),
        token_ids,
        st.lists(token_ids, min_size=1, max_size=3),
    ),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
}
CHAT_FIELDS = {
    **SAMPLING,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=12)}
        ),
        min_size=1,
        max_size=3,
    ),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 16),
}


@st.composite
def bodies(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str) -> dict:
    """A plausible request (so that many get deep into the server), then 0-2 fields broken or dropped."""
    optional = {k: v for k, v in fields.items() if k != required}
    body = draw(st.fixed_dictionaries({required: fields[required]}, optional=optional))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([*fields, "stream_options", "bogus_field"]))
        if draw(st.booleans()):
            body[key] = draw(junk)
        else:
            body.pop(key, None)
    return body


def _post_and_check(server, path: str, body: dict) -> None:
    data = json.dumps(body, allow_nan=True)  # NaN / Infinity literals included: the server must reject them
    with httpx.stream(
        "POST",
        server.url(path),
        content=data,
        timeout=60,
        headers={**server.headers, "content-type": "application/json"},
    ) as r:
        raw = r.read().decode("utf-8", errors="replace")
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {raw[:500]}"
    if r.status_code >= 400:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        # SSE lines end with "\n"; str.splitlines would also split inside a JSON string at U+2028 & co.
        events = [line for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", raw[-500:]
        for e in events[:-1]:
            assert "error" not in json.loads(e[6:]), e
    else:
        assert json.loads(raw)["choices"]


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
def test_fuzz_completions_never_5xx(server, body):
    _post_and_check(server, C, body)


@FUZZ
@given(body=bodies(CHAT_FIELDS, "messages"))
def test_fuzz_chat_never_5xx(server, body):
    _post_and_check(server, CHAT, body)


def test_server_survives_fuzzing(server, http):
    assert httpx.get(server.url("/health")).status_code == 200
    r = http.post(C, json={"prompt": "still up", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert not math.isnan(server.metric("kiln:num_requests_running"))


# ------------------------------------------------------------------------------ limits and field names


LIMIT_CASES = [
    bad("too-many-prompts", {"prompt": ["a"] * 1030}, "prompt"),
    bad("prompt-alone-beyond-context", {"prompt": [1] * 300, "max_tokens": 4}, "prompt", CTX),
    bad("prompt-fits-completion-does-not", {"prompt": [1] * 250, "max_tokens": 10}, "max_tokens", CTX),
    bad(
        "max-completion-tokens-zero",
        {"messages": USER, "max_completion_tokens": 0},
        "max_completion_tokens",
        path=CHAT,
    ),
    bad(
        "unknown-content-part",
        {"messages": [{"role": "user", "content": [{"type": "foo"}]}]},
        "messages",
        path=CHAT,
    ),
    bad("too-many-stop-strings", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    bad(
        "too-many-stop-strings-chat",
        {"messages": USER, "stop": [f"s{i}" for i in range(17)]},
        "stop",
        path=CHAT,
    ),
    bad("stop-string-too-long", {"prompt": "x", "stop": "y" * 1001}, "stop"),
]


@pytest.mark.parametrize("path, body, status, param, code", LIMIT_CASES)
def test_limits_get_400_naming_the_field(http, path, body, status, param, code):
    test_bad_input_gets_status_and_envelope(http, path, body, status, param, code)


def test_limit_messages_say_what_is_allowed(http):
    err = check_envelope(http.post(C, json={"prompt": ["a"] * 1030}))
    assert "1030 prompts" in err["message"] and "--max-queued-requests 1024" in err["message"], err
    err = check_envelope(http.post(C, json={"prompt": [1] * 300, "max_tokens": 4}))
    assert "300 input tokens" in err["message"] and "length of the prompt." in err["message"], err
    err = check_envelope(http.post(CHAT, json={"messages": USER, "max_completion_tokens": 0}))
    assert err["message"].startswith("max_completion_tokens must be") and "max_tokens" not in err["message"]
    err = check_envelope(http.post(CHAT, json={"messages": [{"role": "user", "content": [{"type": "foo"}]}]}))
    assert "'foo'" in err["message"] and "not supported" in err["message"] and "'text'" in err["message"]
    assert "valid string" not in err["message"]
    err = check_envelope(http.post(C, json={"prompt": "x", "stop": [f"s{i}" for i in range(17)]}))
    assert "at most 16" in err["message"] and "got 17" in err["message"], err
    err = check_envelope(http.post(C, json={"prompt": "x", "stop": ["a", "y" * 1001]}))
    assert "at most 1000 characters" in err["message"] and "stop[1]" in err["message"], err
    # exactly at the limits is fine
    ok = http.post(
        C, json={"prompt": "x", "max_tokens": 2, "stop": [f"s{i}" for i in range(15)] + ["y" * 1000]}
    )
    assert ok.status_code == 200, ok.text
