"""Front-end side of a request: detokenize, match stop strings, build RequestOutputs.

Runs in the user's process. The executor sends token ids; this turns them into text and decides
when a stop string has ended a sequence (the executor is then told to abort it with reason "stop").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.executor.messages import PromptLogprobs, SequenceUpdate
from kiln.outputs import CompletionOutput, LogprobsDict, RequestMetrics, RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Sequence:
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""  # everything decoded so far, trimmed at a stop string once one matched
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestState:
    """Everything the front end knows of one request while it runs."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.seqs = [
            _Sequence(
                detok=IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
                if tokenizer is not None
                else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        self.prompt_logprobs: list[LogprobsDict | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.num_cached_tokens = 0
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.sent = False  # the engine has been sent the request
        self.aborted = False  # the caller aborted it (maybe before it was sent)
        # Longest text a stop string could still need to complete: held back while streaming.
        self._holdback = max((len(s) for s in params.stop_list), default=1) - 1

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def abort(self) -> None:
        """End every unfinished sequence with finish_reason "abort": the caller stopped the request."""
        for s in self.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        if self.metrics.finished_time is None:
            self.metrics.finished_time = time.time()

    def apply(self, up: SequenceUpdate, abort_seq: Callable[[int, str], None]) -> None:
        """Fold one update in; ``abort_seq(seq_index, stop)`` stops a sequence that hit a stop string."""
        if up.prompt_logprobs and self.prompt_logprobs is not None:
            self._add_prompt_logprobs(up.prompt_logprobs)
        seq = self.seqs[up.seq_index]
        if seq.finish_reason is not None:  # stopped here already; the executor's late tokens are dropped
            return
        self.num_cached_tokens = max(self.num_cached_tokens, up.num_cached_tokens)
        if self.metrics.first_scheduled_time is None and up.first_scheduled_time is not None:
            self.metrics.first_scheduled_time = up.first_scheduled_time
            self.metrics.queued_time = up.queued_time
        if up.new_token_ids and self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.time()
        for i, tok in enumerate(up.new_token_ids):
            seq.token_ids.append(tok)
            lp = up.new_logprobs[i] if i < len(up.new_logprobs) else 0.0
            seq.cumulative_logprob += lp
            if seq.logprobs is not None:
                entry: LogprobsDict = {tok: lp}
                for tid, tlp in (up.new_top[i] if up.new_top else [])[: self.params.logprobs]:
                    entry.setdefault(tid, tlp)
                seq.logprobs.append(entry)
        if seq.detok is not None:
            prev_len = len(seq.text)
            new_ids = up.new_token_ids
            # A stop token (EOS, stop_token_ids) ends the text without adding its own, as in vLLM
            if up.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                new_ids = new_ids[:-1]
            seq.text += seq.detok.add(new_ids)
            if up.finished:
                seq.text += seq.detok.flush()
            if self._match_stop(seq, prev_len):
                abort_seq(up.seq_index, str(seq.stop_reason))
                return
        if up.finished:
            seq.finish_reason, seq.stop_reason = up.finish_reason, up.stop_reason
            if self.metrics.finished_time is None and self.finished:
                self.metrics.finished_time = time.time()

    def _match_stop(self, seq: _Sequence, prev_len: int) -> bool:
        stops = self.params.stop_list
        # min_tokens holds back stop strings too, as it does EOS and stop_token_ids (vLLM does the same)
        if not stops or len(seq.text) == prev_len or len(seq.token_ids) < self.params.min_tokens:
            return False
        # Only a match that ends in the new text is new (one in older text was held back by min_tokens).
        # Of those, the one that starts first wins, so the text never holds a stop string.
        best: tuple[int, str] | None = None
        for s in stops:
            idx = seq.text.find(s, max(0, prev_len - len(s) + 1))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        seq.text = seq.text[: idx + len(s)] if self.params.include_stop_str_in_output else seq.text[:idx]
        seq.finish_reason, seq.stop_reason = "stop", s
        if self.finished:
            self.metrics.finished_time = time.time()
        return True

    def _add_prompt_logprobs(self, chunks: list[PromptLogprobs]) -> None:
        assert self.prompt_logprobs is not None
        k = self.params.prompt_logprobs or 0
        for c in chunks:
            for i in range(len(c.token_logprobs)):
                pos = c.start + i + 1
                if pos >= len(self.prompt_token_ids):
                    break
                entry: LogprobsDict = {self.prompt_token_ids[pos]: float(c.token_logprobs[i])}
                for tid, tlp in zip(c.top_ids[i][:k].tolist(), c.top_logprobs[i][:k].tolist(), strict=True):
                    entry.setdefault(int(tid), float(tlp))
                self.prompt_logprobs.append(entry)

    def output(self) -> RequestOutput:
        """A cumulative snapshot; text that may still become a stop string is held back while running."""
        outs = []
        for i, s in enumerate(self.seqs):
            text = s.text
            if s.finish_reason is None and self._holdback > 0:
                text = text[: max(0, len(text) - self._holdback)]
            outs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=list(s.token_ids),
                    logprobs=[dict(d) for d in s.logprobs] if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=outs,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )
