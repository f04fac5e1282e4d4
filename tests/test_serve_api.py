"""`kiln serve` through the official openai client: both endpoints, streaming or not, against LLM.generate.

One real server process (tiny random Llama, CPU) serves the module; an in-process LLM over the same
model gives the expected outputs.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_serve_harness import API_KEY, MODEL_NAME, ServerProcess

from kiln.sampling_params import SamplingParams

OpenAI = pytest.importorskip("openai", reason="needs the openai client (pip install 'kiln[test]')").OpenAI

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
PROMPTS = ["The quick brown fox", "def fibonacci(n):\n"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model(tokenizer=True)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_api")
    (d / "chat.jinja").write_text(TEMPLATE)
    with ServerProcess(model, "--chat-template", str(d / "chat.jinja"), log_dir=d) as s:
        yield s


@pytest.fixture(scope="module")
def llm(model):
    from kiln import LLM

    with LLM(model) as engine:
        yield engine


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=60)


def _gen(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def test_models_health_version(server):
    h = server.headers
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}  # no key needed
    assert httpx.head(server.url("/health")).status_code == 200  # load balancers probe with HEAD too
    models = httpx.get(server.url("/v1/models"), headers=h).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == 256
    assert httpx.get(server.url(f"/v1/models/{MODEL_NAME}"), headers=h).json()["id"] == MODEL_NAME
    assert httpx.get(server.url("/version"), headers=h).json()["version"]


def test_completions_equal_llm_generate(client, llm):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    total = 0
    for prompt, choice in zip(PROMPTS, resp.choices, strict=True):
        ref = _gen(llm, prompt, temperature=0, max_tokens=12).outputs[0]
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
        total += len(ref.token_ids)
    assert resp.usage.completion_tokens == total
    ids = llm.tokenizer.encode(PROMPTS[0])
    assert resp.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode(PROMPTS[1]))
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    id_lists = [llm.tokenizer.encode(p) for p in PROMPTS]
    by_lists = client.completions.create(model=MODEL_NAME, prompt=id_lists, max_tokens=12, temperature=0)
    assert [c.text for c in by_lists.choices] == [c.text for c in resp.choices]


def test_sampling_extras_equal_llm_generate(client, llm):
    kw = dict(temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=10)
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.2, min_tokens=4, ignore_eos=True)
    bias = {"17": 5.0, "42": -100.0}
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], logit_bias=bias, extra_body=extra, **kw
    )
    ref = _gen(llm, PROMPTS[0], logit_bias={17: 5.0, 42: -100.0}, **kw, **extra).outputs[0]
    assert resp.choices[0].text == ref.text
    assert resp.usage.completion_tokens == len(ref.token_ids) == 10


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=11, n=2)
    full = client.completions.create(**kw)
    texts = {0: "", 1: ""}
    finish = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        for c in chunk.choices:
            assert c.index not in finish, "no chunk after a choice's finish"
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_sends_tokens_that_add_no_text(client):
    # a special token decodes to "": its steps still reach the client, so time to first token and
    # inter-token times are the engine's, not the time until some token happens to have text
    kw = dict(model=MODEL_NAME, max_tokens=16, temperature=0, logit_bias={"1": 100}, stream=True)
    chunks = [c for c in client.completions.create(prompt=PROMPTS[0], **kw) if c.choices]
    assert all(c.choices[0].text == "" for c in chunks)
    assert len(chunks) >= 2 and chunks[0].choices[0].finish_reason is None
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = [c for c in client.chat.completions.create(messages=MESSAGES, **kw) if c.choices]
    # the role chunk, then at least one content chunk before the last one
    assert chat[0].choices[0].delta.role == "assistant"
    assert len(chat) >= 3 and all(not c.choices[0].delta.content for c in chat)
    assert chat[-1].choices[0].finish_reason == "length"


def test_chat_equals_llm_chat_streaming_or_not(client, llm):
    ref = llm.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=10), chat_template=TEMPLATE, use_tqdm=False
    )[0]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    msg = resp.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == ref.outputs[0].text
    assert msg.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.outputs[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_n_and_seed_reproducible(client, llm):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = [x.text for x in a.choices]
    assert sorted(x.index for x in a.choices) == [0, 1, 2]
    assert texts == [x.text for x in b.choices]
    assert texts != [x.text for x in c.choices]
    ref = _gen(llm, PROMPTS[0], n=3, temperature=1.0, seed=7, max_tokens=8)
    assert texts == [o.text for o in ref.outputs]
    chat = [
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, n=2, seed=5)
        for _ in range(2)
    ]
    assert [ch.message.content for ch in chat[0].choices] == [ch.message.content for ch in chat[1].choices]


def test_stop_strings_and_stop_token_ids(client, llm):
    base = _gen(llm, PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True).outputs[0]
    text = base.text
    stop = next(ch for i, ch in enumerate(text) if i > 1 and ch not in text[:i] and ch not in "\ufffd")
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.text == text[: text.index(stop)]
    assert choice.stop_reason == stop
    ref = _gen(llm, PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]).outputs[0]
    assert choice.text == ref.text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPTS[1],
            max_tokens=24,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == choice.text
    inc = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert inc.choices[0].text == text[: text.index(stop) + 1]
    tok = base.token_ids[5]
    by_id = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [tok]},
    )
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].stop_reason == tok
    assert by_id.usage.completion_tokens == base.token_ids.index(tok) + 1
    # the stop token's own text is left out of the text, as vLLM does, streamed or not
    before = llm.tokenizer.decode(base.token_ids[: base.token_ids.index(tok)])
    assert by_id.choices[0].text == before
    streamed = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[1],
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "stop_token_ids": [tok]},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == before


def test_logprobs_both_endpoints(client, llm):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
    )
    lp = resp.choices[0].logprobs
    ref = _gen(llm, PROMPTS[0], temperature=0, max_tokens=6, logprobs=3).outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == resp.choices[0].text or "\ufffd" in resp.choices[0].text
    for got, tid, d, top in zip(lp.token_logprobs, ref.token_ids, ref.logprobs, lp.top_logprobs, strict=True):
        assert got == pytest.approx(d[tid], abs=1e-5)
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(max(d.values()), abs=1e-5)  # greedy: the best is sampled
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy
        assert entry.bytes == list(entry.token.encode())
    streamed = [
        e
        for c in client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_echo(client, llm):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True
    )
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert resp.choices[0].text == PROMPTS[0] + plain.choices[0].text
    with_lp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    lp = with_lp.choices[0].logprobs
    n_prompt = with_lp.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    ref = _gen(llm, PROMPTS[0], temperature=0, max_tokens=4, prompt_logprobs=1)
    ids = ref.prompt_token_ids
    for i in range(1, n_prompt):
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-5)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True, stream=True
        )
    )
    assert streamed == resp.choices[0].text


def test_usage_reports_cached_prefix_tokens(client):
    prompt = [(7 * i) % 300 + 1 for i in range(100)]  # three full 32-token blocks
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == 100
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    assert second.choices[0].text == first.choices[0].text


def test_tokenize_detokenize(server, llm):
    h = server.headers
    r = httpx.post(server.url("/tokenize"), headers=h, json={"prompt": PROMPTS[1]}).json()
    assert r["tokens"] == llm.tokenizer.encode(PROMPTS[1]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    back = httpx.post(server.url("/detokenize"), headers=h, json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == PROMPTS[1]
    eos = llm.tokenizer.eos_token_ids[0]
    kept = httpx.post(server.url("/detokenize"), headers=h,
                      json={"tokens": r["tokens"] + [eos], "skip_special_tokens": False}).json()  # fmt: skip
    assert kept["prompt"] == llm.tokenizer.decode(r["tokens"] + [eos], skip_special_tokens=False)
    assert kept["prompt"] != back["prompt"]  # the special token is in the text
    chat = httpx.post(server.url("/tokenize"), headers=h, json={"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE)


def test_metrics_and_request_log(server, client):
    client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert server.metric("kiln:prompt_tokens_total") > 0
    assert server.metric("kiln:generation_tokens_total") >= 3
    assert server.metric("kiln:time_to_first_token_seconds_count") >= 1
    assert server.metric("kiln:time_per_output_token_seconds_count") >= 1
    assert server.metric("kiln:e2e_request_latency_seconds_count") >= 1
    assert server.metric("kiln:request_success_total") >= 1
    assert server.metric("kiln:prefix_cache_queries_total") >= server.metric("kiln:prefix_cache_hits_total")
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
    ):
        server.metric(f"kiln:{name}")
    text = httpx.get(server.url("/metrics"), headers=server.headers).text
    assert 'kiln:request_success_total{finished_reason="length",model_name="tiny"}' in text
    log = server.log()
    assert "request cmpl-" in log and "ttft=" in log and "finish=length" in log


@pytest.mark.parametrize("text", ["a\u2028b", "line\u2029sep", "nel\x85x", "ctl\x1c\x1d\x1e\x0b\x0cz", "é ✓"])
def test_sse_event_stays_one_line_whatever_the_text(text):
    # Line readers (str.splitlines, httpx's aiter_lines) break at more than "\n": every one of those
    # characters must reach the client escaped, inside one "data:" line that parses back to the text.
    from kiln.serve.protocol import CompletionChoice, CompletionResponse
    from kiln.serve.sse import event

    model = CompletionResponse(id="c", model="m", choices=[CompletionChoice(index=0, text=text)])
    for obj in ({"text": text}, model):
        raw = event(obj).decode("utf-8")
        lines = [ln for ln in raw.splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("data: ")
        got = json.loads(lines[0][6:])
        assert (got["text"] if "text" in got else got["choices"][0]["text"]) == text


def test_developer_role_is_the_system_role(server):
    def tokens(role: str) -> list[int]:
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        r = httpx.post(
            server.url("/tokenize"), json={"messages": messages}, headers=server.headers, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokens("developer") == tokens("system")
