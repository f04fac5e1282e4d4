"""Front-end pieces on their own: sampling params validation, detokenizer, stop strings, codec."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import save_tiny_tokenizer

from kiln.config import EngineLimits, KvCacheConfig, SchedulerConfig
from kiln.executor import codec
from kiln.executor.messages import PromptLogprobs, Request, SequenceUpdate
from kiln.output_processor import RequestState
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return Tokenizer(str(path))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": -1}, "temperature must be a finite number >= 0 (0: greedy), got -1"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"min_p": 2}, "min_p must be in [0, 1]"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens (5) must be <= max_tokens (2)"),
        ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"logprobs": 21}, "logprobs must be None or an integer in [0, 20]"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"logit_bias": {1: 200.0}}, "logit_bias values must be in [-100, 100]"),
        ({"seed": -1}, "seed must be None or an integer"),
        # bools are not ints, and each field's type is checked
        ({"n": True}, "n must be an integer >= 1, got True"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"top_k": True}, "top_k must be -1"),
        ({"seed": True}, "seed must be None or an integer"),
        ({"logprobs": True}, "logprobs must be None or an integer"),
        ({"logit_bias": {True: 5.0}}, "logit_bias keys must be token ids >= 0, got True"),
        ({"stop_token_ids": [True]}, "stop_token_ids must be token ids >= 0, got True"),
        ({"stop_token_ids": 5}, "stop_token_ids must be None or a list of token ids, got int"),
        ({"stop": 123}, "stop must be None, a string or a list of strings, got int"),
        ({"stop": b"xy"}, "stop must be None, a string or a list of strings, got bytes"),
        ({"stop": {"a": 1}}, "stop must be None, a string or a list of strings, got dict"),
        ({"cache_salt": 5}, "cache_salt must be None or a string, got 5"),
        ({"ignore_eos": "no"}, "ignore_eos must be True or False, got 'no'"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be True or False, got None"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert fragment in str(e.value)


def test_validate_checks_a_changed_field_and_recomputes_stop_list():
    sp = SamplingParams(stop="a")
    sp.stop = ["b", "c"]
    sp.validate()
    assert sp.stop_list == ["b", "c"]
    sp.top_p = 0.0
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        sp.validate()


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="tokens_per_block must be one of"):
        KvCacheConfig(tokens_per_block=24)
    with pytest.raises(ValueError, match="free_gpu_memory_fraction must be in"):
        KvCacheConfig(free_gpu_memory_fraction=0)
    with pytest.raises(ValueError, match="policy must be"):
        SchedulerConfig(policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_num_tokens .* must be >= max_batch_size"):
        EngineLimits(max_batch_size=64, max_num_tokens=32)


@pytest.fixture(params=["stream", "window"])
def detok_tok(request, tok) -> Tokenizer:
    """The tokenizer with the Rust decode stream (fast path) or without it (the windowed fallback)."""
    import copy

    t = copy.copy(tok)
    if request.param == "window":
        t.stream_backend = None
    else:
        assert t.stream_backend is not None
    return t


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 319), min_size=1, max_size=40), chunk=st.integers(1, 4))
def test_detokenizer_deltas_concatenate_to_decoded_text(detok_tok, ids, chunk):
    tok = detok_tok
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    pieces = [d.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    # No piece but the last may end inside a multi-byte character.
    assert all(not p.endswith("\ufffd") for p in pieces[:-2] if p)


def test_detokenizer_holds_back_split_utf8(detok_tok):
    tok = detok_tok
    ids = tok.encode("東")
    assert len(ids) > 1, "the test needs a character split over several byte tokens"
    d = IncrementalDetokenizer(tok, tok.encode("x"), skip_special_tokens=True)
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "東"


def _state(tok, **kw) -> RequestState:
    return RequestState("r", "p", tok.encode("p"), SamplingParams(**kw), tok)


def _feed(state: RequestState, tok, text: str, finished_at_end: bool = False) -> list[tuple[int, str]]:
    aborted: list[tuple[int, str]] = []
    ids = tok.encode(text)
    for i, t in enumerate(ids):
        last = finished_at_end and i == len(ids) - 1
        up = SequenceUpdate("r", 0, [t], [-0.5], finished=last, finish_reason="length" if last else None)
        state.apply(up, lambda s, stop: aborted.append((s, stop)))
    return aborted


def test_stop_string_across_token_boundaries_is_trimmed(tok):
    state = _state(tok, stop=["brown fox"], max_tokens=100)
    aborted = _feed(state, tok, "The quick brown fox jumps")
    out = state.output()
    assert aborted == [(0, "brown fox")]
    assert out.outputs[0].text == "The quick "
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == "brown fox"
    assert out.finished


def test_stop_string_included_when_asked(tok):
    state = _state(tok, stop=["fox"], include_stop_str_in_output=True)
    _feed(state, tok, "The quick brown fox jumps")
    assert state.output().outputs[0].text == "The quick brown fox"


def test_min_tokens_holds_back_stop_strings(tok):
    text = "ab fox cd fox ef"
    n = len(tok.encode(text))
    early = len(tok.encode("ab fox"))
    state = _state(tok, stop=["fox"], min_tokens=early + 1, max_tokens=100)
    aborted = _feed(state, tok, text)
    assert aborted == [(0, "fox")] and state.output().outputs[0].text == "ab fox cd "  # the second one
    assert early + 1 < n
    state = _state(tok, stop=["fox"], max_tokens=100)
    _feed(state, tok, text)
    assert state.output().outputs[0].text == "ab "  # without min_tokens, the first


def test_abort_ends_unfinished_sequences_with_abort(tok):
    state = _state(tok, n=2, max_tokens=100)
    _feed(state, tok, "The quick")
    state.apply(SequenceUpdate("r", 1, [5], [-0.5], finished=True, finish_reason="length"), lambda *a: None)
    state.abort()
    out = state.output()
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "length"]
    assert out.outputs[0].text == "The quick" and out.metrics.finished_time is not None


def test_streamed_text_holds_back_possible_stop_prefix(tok):
    state = _state(tok, stop=["lazy dog"])
    _feed(state, tok, "over the lazy")
    running = state.output().outputs[0]
    assert running.finish_reason is None
    assert not running.text.endswith("lazy"), "a prefix of a stop string must not be streamed yet"
    _feed(state, tok, " cat", finished_at_end=True)
    done = state.output().outputs[0]
    assert done.text == "over the lazy cat" and done.finish_reason == "length"


def test_logprobs_entries_put_sampled_token_first(tok):
    state = _state(tok, logprobs=2)
    top = [[(7, -0.1), (5, -1.0)]]
    up = SequenceUpdate("r", 0, [5], [-1.0], new_top=top, finished=True, finish_reason="length")
    state.apply(up, lambda *a: None)
    out = state.output().outputs[0]
    assert list(out.logprobs[0].items()) == [(5, -1.0), (7, -0.1)]
    assert out.cumulative_logprob == -1.0


def test_prompt_logprobs_assembled_from_chunks(tok):
    prompt = tok.encode("The quick brown")
    state = RequestState("r", None, prompt, SamplingParams(prompt_logprobs=1), tok)
    n = len(prompt) - 1
    lps = -np.arange(1, n + 1, dtype=np.float32)
    chunks = [
        PromptLogprobs(0, 0, lps[:2], np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32)),
        PromptLogprobs(0, 2, lps[2:], np.zeros((n - 2, 1), np.int32), np.zeros((n - 2, 1), np.float32)),
    ]
    state.apply(SequenceUpdate("r", 0, [], [], prompt_logprobs=chunks), lambda *a: None)
    pl = state.output().prompt_logprobs
    assert pl[0] is None and len(pl) == len(prompt)
    assert [d[prompt[i + 1]] for i, d in enumerate(pl[1:])] == pytest.approx(lps.tolist())


def test_codec_round_trips_messages():
    req = Request("a", [1, 2, 3], SamplingParams(n=2, stop=["x"], logit_bias={3: 1.5}, seed=7), (0, 2), 1.5)
    back = codec.decode(codec.encode(("add", req)))
    assert back[0] == "add" and back[1].params.logit_bias == {3: 1.5} and back[1].eos_token_ids == (0, 2)
    assert back[1].params.stop_list == ["x"] and back[1].prompt_token_ids == [1, 2, 3]
    pl = PromptLogprobs(1, 0, np.ones(3, np.float32), np.ones((3, 2), np.int32), np.ones((3, 2), np.float32))
    up = SequenceUpdate("a", 1, [4], [-0.1], new_top=[[(4, -0.1)]], prompt_logprobs=[pl], finished=True)
    got = codec.decode(codec.encode(up))
    assert got.prompt_logprobs[0].top_ids.dtype == np.int32 and got.prompt_logprobs[0].top_ids.shape == (3, 2)
    assert got.finished and got.new_token_ids == [4] and got.new_top == [[(4, -0.1)]]
    rejected = SequenceUpdate(
        "b", 0, [], [], finished=True, error="no", rejected=True, first_scheduled_time=2.5
    )
    assert codec.decode(codec.encode(("updates", [rejected], None)))[1][0] == rejected
    # a step's updates, plain ones and ones with logprobs mixed, come back equal and in order
    plain = SequenceUpdate("c", 2, [5, 6], [-0.2, -0.3], num_cached_tokens=16, stop_reason="END")
    step = [plain, up, rejected]
    back = codec.decode(codec.encode(("updates", step, None)))[1]
    assert [b.request_id for b in back] == ["c", "a", "b"] and back[0] == plain and back[2] == rejected
    assert back[1].new_top == [[(4, -0.1)]] and back[1].prompt_logprobs[0].token_logprobs.shape == (3,)


def test_codec_sends_one_sampling_params_once_for_many_requests():
    # LLM.generate gives every prompt one SamplingParams object: an "add" message carries it once and
    # the worker's requests share it again; distinct objects stay distinct, in order.
    shared = SamplingParams(max_tokens=7, stop="end", stop_token_ids=[9], logit_bias={5: -2.0}, seed=3)
    other = SamplingParams(temperature=0.5, top_p=0.9, logprobs=2)
    reqs = [Request(f"r{i}", [i, i + 1], shared if i != 2 else other, (0,), float(i)) for i in range(4)]
    one = codec.encode(("add", reqs[0]))
    assert len(codec.encode(("add", reqs[0], reqs[1], reqs[3]))) < 2 * len(one)
    back = codec.decode(codec.encode(("add", *reqs)))
    assert back[0] == "add" and [r.request_id for r in back[1:]] == ["r0", "r1", "r2", "r3"]
    assert back[1].params is back[2].params is back[4].params and back[3].params is not back[1].params
    for sent, got in zip(reqs, back[1:], strict=True):
        assert got == sent and got.params == sent.params  # every field, logit_bias's int keys included
    assert back[1].params.stop_list == ["end"] and back[3].params.logprobs == 2


def test_worker_reads_a_burst_of_messages_a_budget_at_a_time():
    # A burst (LLM.generate's messages of 256 requests) is not drained whole before the loop steps:
    # each receive reads for at most its budget, the rest waits for the next; a closed pipe: shutdown.
    import multiprocessing as mp

    from kiln.executor.client import pipe_receiver

    reader, writer = mp.Pipe(duplex=False)
    for i in range(3):
        writer.send_bytes(codec.encode(("abort", f"r{i}")))
    one_at_a_time = pipe_receiver(reader, budget_s=0.0)
    assert [one_at_a_time(False) for _ in range(3)] == [[("abort", f"r{i}")] for i in range(3)]
    assert one_at_a_time(False) == []
    for i in range(3):
        writer.send_bytes(codec.encode(("abort", f"r{i}")))
    time.sleep(0.05)  # all three in the pipe
    assert pipe_receiver(reader, budget_s=10.0)(True) == [("abort", f"r{i}") for i in range(3)]
    writer.close()
    assert one_at_a_time(True) == [("shutdown",)]


def test_worker_outbox_hands_over_a_message_with_tokens_before_send_returns():
    # The loop waits for the write of a message with tokens (the front end's first token must not wait
    # for the GIL the loop holds while launching the next step); one without tokens is only queued.
    import multiprocessing as mp

    from kiln.executor.client import _Outbox

    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    outbox = _Outbox(writer, wait_s=5.0)
    for i in range(20):
        outbox.send(("updates", [i], None))
        assert reader.poll(0), "send returned before the message with tokens was written"
        assert tuple(codec.decode(reader.recv_bytes()))[1] == [i]
    outbox.send(("updates", [], None))  # stats only: queued, written in the background
    assert tuple(codec.decode(reader.recv_bytes())) == ("updates", [], None)
    outbox.close()


def test_worker_outbox_waits_once_for_a_front_end_that_lags():
    # A write stuck on a full pipe: the send that handed it over waits its wait_s, the next ones do not
    # (the writer is busy), so a lagging front end does not cost the engine loop a wait every step.
    import multiprocessing as mp
    import time

    from kiln.executor.client import _Outbox

    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    outbox = _Outbox(writer, wait_s=1.0)
    big = ["x" * 1_000_000]  # more than any pipe buffer: its write waits for the reader
    t0 = time.perf_counter()
    outbox.send(("updates", big, None))
    t1 = time.perf_counter()
    for _ in range(3):
        outbox.send(("updates", big, None))
    t2 = time.perf_counter()
    assert t1 - t0 >= 0.9 and t2 - t1 < 0.5, (t1 - t0, t2 - t1)
    assert [tuple(codec.decode(reader.recv_bytes()))[1] for _ in range(4)] == [big] * 4
    outbox.close()


def test_worker_outbox_queues_while_the_front_end_does_not_read_and_keeps_order():
    # The engine loop must not wait on a front end that stops reading: sends return while the pipe's
    # buffer is full, and everything arrives, in order, once the reader drains it.
    import multiprocessing as mp
    import threading

    from kiln.executor.client import _Outbox

    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    outbox = _Outbox(writer)
    payload = "x" * 100_000  # ~40 messages fill any pipe buffer many times over
    sent = threading.Event()

    def loop() -> None:
        for i in range(40):
            outbox.send(("updates", i, payload))
        sent.set()

    threading.Thread(target=loop, daemon=True).start()
    assert sent.wait(timeout=60), "a send blocked on the unread pipe"
    got = [tuple(codec.decode(reader.recv_bytes()))[1] for _ in range(40)]
    assert got == list(range(40))
    outbox.send(("fatal", "last words"))
    outbox.close()
    assert tuple(codec.decode(reader.recv_bytes())) == ("fatal", "last words")


class _ScriptedCore:
    """Just enough of EngineCore for run_engine_loop: work is a count of steps left; every call is logged."""

    def __init__(self) -> None:
        from kiln.executor.stats import EngineStats

        self.stats, self.steps_left, self.log = EngineStats(), 0, []

    def has_work(self) -> bool:
        return self.steps_left > 0

    def add_request(self, req: Request) -> list[SequenceUpdate]:
        self.log.append("add")
        self.steps_left = 2
        return []

    def abort(self, *args: object) -> list[SequenceUpdate]:
        self.log.append("abort")
        return [SequenceUpdate(str(args[0]), 0, [], [], finished=True, finish_reason="abort")]

    def step(self) -> list[SequenceUpdate]:
        self.log.append("step")
        self.steps_left -= 1
        return [SequenceUpdate("a", 0, [7], [0.0])]

    def refresh_stats(self):  # noqa: ANN201
        self.stats.num_running = self.steps_left
        return self.stats


def test_engine_loop_sends_an_admission_with_the_step_it_lets_run_and_an_abort_at_once():
    # A request's arrival is not written out on its own before its first step's launch (that write was
    # on its time to first token); an abort's news is, before any further step; stats ride on both.
    from kiln.executor.engine_core import run_engine_loop

    core = _ScriptedCore()
    add = ("add", Request("a", [1, 2], SamplingParams(max_tokens=2)))
    inbox = [[add], [("abort", "b", None, "abort", None)], [("shutdown",)]]

    def receive(block: bool) -> list[tuple]:
        return inbox.pop(0)

    def send(msg: tuple) -> None:
        core.log.append((msg[0], [(u.request_id, u.new_token_ids) for u in msg[1]], msg[2] is not None))

    run_engine_loop(core, receive, send)  # type: ignore[arg-type]
    assert core.log == [
        "add", "step", ("updates", [("a", [7])], True),  # the admission's stats with the first step
        "abort", ("updates", [("b", [])], True),  # at once, before the next step
        "step", ("updates", [("a", [7])], True),  # the last step: stats as the loop runs dry
    ]  # fmt: skip
