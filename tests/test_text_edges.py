"""Generated text at its edges: stop strings and stop tokens, multi-byte characters, streamed snapshots."""

from __future__ import annotations

import pytest
from tiny_tokenizer import save_tiny_tokenizer

from kiln.executor.messages import SequenceUpdate
from kiln.output_processor import RequestState
from kiln.outputs import CompletionOutput
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import Tokenizer

TEXT = "Grüße aus Köln, 東京 と 大阪. Hello"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return Tokenizer(str(path))


def _run(
    tok: Tokenizer, ids: list[int], end: tuple[str, int | None] = ("length", None), **kw
) -> tuple[CompletionOutput, list[str]]:
    """Feed ``ids`` one per step (the last one ends the sequence with ``end``); returns the final
    output and every streamed snapshot's text."""
    state = RequestState("r", "p", tok.encode("p"), SamplingParams(max_tokens=100, **kw), tok)
    snapshots = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        top = [[(t, -0.5), (5, -1.5)]] if kw.get("logprobs") is not None else None
        up = SequenceUpdate(
            "r", 0, [t], [-0.5], new_top=top, finished=last, finish_reason=end[0] if last else None
        )
        up.stop_reason = end[1] if last else None
        state.apply(up, lambda *a: None)
        snapshots.append(state.output().outputs[0].text)
        if state.finished:
            break
    return state.output().outputs[0], snapshots


@pytest.mark.parametrize(
    "stop, cut",
    [
        (["京 と"], "Grüße aus Köln, 東"),  # several tokens, starting inside a character's bytes
        (["東京"], "Grüße aus Köln, "),
        (["üß"], "Gr"),
        (["Köln", "ö"], "Grüße aus K"),  # the one completed first ends the text
        (["aus", "Grüße aus"], ""),  # completed by the same token: the one that starts first
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_over_multibyte_text(tok, stop, cut, include):
    ids = tok.encode(TEXT)
    out, snapshots = _run(tok, ids, stop=stop, include_stop_str_in_output=include, logprobs=1)
    assert out.finish_reason == "stop" and out.stop_reason in stop
    assert out.text == (cut + out.stop_reason if include else cut)
    # token ids (and logprobs, one entry per token) up to the token that completed the match
    n = len(out.token_ids)
    assert tok.decode(ids[:n]).startswith(cut + out.stop_reason)
    assert not tok.decode(ids[: n - 1]).startswith(cut + out.stop_reason)
    assert out.token_ids == ids[:n] and len(out.logprobs) == n
    assert all(t in entry for t, entry in zip(out.token_ids, out.logprobs, strict=True))
    # streamed snapshots only ever grow, up to the final text
    assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:], strict=False))
    assert snapshots[-1] == out.text


def test_stop_string_must_end_in_text_after_min_tokens(tok):
    text = "ab fox cd fox ef"  # tokens: a b ' f' ox ' ' c d ' f' ox ' ' e f
    # the first "o" falls inside min_tokens; the longer stop string must not widen the search back to it
    out, _ = _run(tok, tok.encode(text), stop=["o", "cd fox ef zz"], min_tokens=5)
    assert out.text == "ab fox cd f" and out.stop_reason == "o"


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_is_not_in_the_output(tok, include):
    ids = tok.encode("Hello world!")
    stop_id = ids[-1]  # "!": an ordinary token named in stop_token_ids
    out, snapshots = _run(
        tok, ids, end=("stop", stop_id), stop_token_ids=[stop_id], include_stop_str_in_output=include
    )
    assert out.token_ids == ids and out.stop_reason == stop_id
    assert out.text == ("Hello world!" if include else "Hello world")
    assert snapshots[-1] == out.text


def test_eos_text_is_not_in_the_output_with_special_tokens_kept(tok):
    ids = tok.encode("Hello") + [tok.eos_token_ids[0]]
    out, _ = _run(tok, ids, end=("stop", None), skip_special_tokens=False)
    assert out.text == "Hello" and out.token_ids == ids
    # a special token sampled before the end stays in the text
    out, _ = _run(tok, [ids[0], 2, *ids[1:]], end=("stop", None), skip_special_tokens=False)
    assert out.text == "He<|assistant|>llo"
