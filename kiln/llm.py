"""LLM: the Python face of kiln. Tokenizes, validates, submits to the executor, detokenizes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from kiln.config import KvCacheConfig, SchedulerConfig
from kiln.engine_args import resolve_engine_config
from kiln.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from kiln.executor.messages import Request
from kiln.executor.stats import EngineStats
from kiln.model_files import read_model_files
from kiln.output_processor import RequestState
from kiln.outputs import RequestOutput
from kiln.prompt_input import (
    PromptType,
    as_params_list,
    as_prompt_list,
    check_request,
    prompt_token_ids,
    text_content,
    validate_params,
)
from kiln.sampling_params import SamplingParams
from kiln.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput | Exception], None]
_SUBMIT_CHUNK = 256  # requests per message when generate() sends a large batch


class LLM:
    """An engine over one model. ``model=None`` serves the embedded demo model.

    ``model`` is a Hugging Face checkpoint directory or an engine directory built by ``kiln build``;
    an engine's plan.json gives the defaults of the limits, dtype, tokens_per_block and plugins, and
    limits above the built ones are refused. Without a plan: max_batch_size 256, max_seq_len =
    max_position_embeddings, and max_num_tokens whole GEMM waves of the GPU near 8,192 (8,448 on an
    H100; ``kiln/engine/token_budget.py``), 8,192 on the CPU.

    On a GPU the executor runs in a worker process; on the CPU in a thread (``executor`` picks).
    ``overlap_scheduling`` (default: on for CUDA) schedules and launches each step while the device
    still runs the previous one; outputs are the same either way.
    ``cuda_graphs`` (CUDA) replays decode-only steps from graphs captured per padded batch size, and
    with ``piecewise_graphs`` also prefill and mixed steps, from graphs of the pieces between two
    attentions captured per padded token count.
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        max_seq_len: int | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        seed: int = 0,
        plugins: dict[str, str] | None = None,
        plugin_backend: str | None = None,
        executor: str = "auto",
        cuda_graphs: bool = True,
        piecewise_graphs: bool = True,
        compile: bool | None = None,
        overlap_scheduling: bool | None = None,
    ) -> None:
        if model is None:
            from kiln.demo import demo_model_path

            model = demo_model_path()
        files = read_model_files(model)
        cfg, use_process = resolve_engine_config(
            model,
            files,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            max_seq_len=max_seq_len,
            kv_cache_config=kv_cache_config,
            scheduler_config=scheduler_config,
            seed=seed,
            plugins=plugins,
            plugin_backend=plugin_backend,
            executor=executor,
            cuda_graphs=cuda_graphs,
            piecewise_graphs=piecewise_graphs,
            compile=compile,
            overlap_scheduling=overlap_scheduling,
        )
        limits = cfg.limits
        max_seq_len = limits.max_seq_len
        self.model_path = model
        self.model_name = files.name
        self.limits = limits
        self.max_seq_len = max_seq_len
        self._files = files
        self.tokenizer = Tokenizer(tokenizer or model, eos_token_ids=files.eos_token_ids)
        self._states: dict[str, RequestState] = {}
        self._sinks: dict[str, tuple[Sink, bool]] = {}  # request id -> (sink, wants every update)
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._dead: str | None = None
        self._closed = False
        self._stats = EngineStats()
        from kiln.executor.client import ProcessExecutor, ThreadExecutor

        t_start = time.perf_counter()
        self._executor = (ProcessExecutor if use_process else ThreadExecutor)(cfg, self._on_output)
        self.vocab_size: int = int(self._executor.info["vocab_size"])
        self.engine_info: dict[str, Any] = dict(self._executor.info)
        self._stats = EngineStats(num_free_blocks=int(self.engine_info["num_free_blocks"]))  # until a step
        # the engine may have picked the token budget (its card's, when none was given)
        self.limits = replace(limits, max_num_tokens=int(self.engine_info["max_num_tokens"]))
        self.engine_info["startup_seconds"] = time.perf_counter() - t_start
        log.info("engine ready: %s", self.startup_summary())

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in the order of the prompts. A request the engine
        fails (its error names the prompt) or an interrupt ends the call and aborts the rest of the batch."""
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompt_list), self.default_sampling_params)
        validate_params(params_list)
        prepared = []
        for i, (p, sp) in enumerate(zip(prompt_list, params_list, strict=True)):
            try:
                prepared.append(self._prepare(p, sp, validated=True))
            except InvalidRequestError as e:
                _naming_prompt(e, i, len(prompt_list))
                raise
        results: dict[int, RequestOutput | Exception] = {}  # by prompt index
        errors: list[tuple[int, Exception]] = []
        done = threading.Condition()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(prepared), desc="generate", unit="req", disable=not use_tqdm or len(prepared) < 2
        )
        t0, n_out = time.perf_counter(), 0

        def sink_for(i: int) -> Sink:
            def sink(item: RequestOutput | Exception) -> None:
                with done:
                    results[i] = item
                    if isinstance(item, Exception):
                        errors.append((i, item))
                    done.notify_all()
                bar.update(1)

            return sink

        items = [
            (None, text, token_ids, sp, sink_for(i), False)
            for i, (text, token_ids, sp) in enumerate(prepared)
        ]
        ids: list[str] = []
        try:
            # Every prompt is validated above, before any is sent. Then messages of _SUBMIT_CHUNK requests:
            # the first one already fills the engine's first steps, and the engine runs while the rest are
            # registered, encoded and queued (~0.1-0.2 ms of host work a request on both sides).
            for i in range(0, len(items), _SUBMIT_CHUNK):
                ids += self._submit(items[i : i + _SUBMIT_CHUNK])
            with done:
                while len(results) < len(items) and not errors and self._dead is None:
                    done.wait(timeout=0.5)
        finally:
            bar.close()
            # a failed request, an interrupt or a dead engine ends the call: the rest must not run on
            with done:
                unfinished = [rid for i, rid in enumerate(ids) if i not in results]
            for rid in unfinished:
                self._abort(rid, deliver=False)
        if errors:
            i, err = errors[0]
            raise err if isinstance(err, EngineDeadError) else _naming_prompt(err, i, len(items))
        outs: list[RequestOutput] = []
        for i in range(len(items)):
            item = results.get(i) or EngineDeadError(self._dead_message())
            if isinstance(item, Exception):
                raise item
            outs.append(item)
            n_out += sum(len(c.token_ids) for c in item.outputs)
        self.last_generate_summary = (len(outs), n_out, time.perf_counter() - t0)
        return outs

    async def generate_async(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        streaming: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs (every update if ``streaming``, else only the final one).

        Closing the generator before the end aborts the request and frees its KV cache.
        """
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a string, got {request_id!r}", param="request_id")
        prompt_text, token_ids, sp = self._prepare(prompt, sampling_params or self.default_sampling_params())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()

        def sink(item: RequestOutput | Exception) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)  # raises once the loop is closed

        rid = self._submit([(request_id or None, prompt_text, token_ids, sp, sink, streaming)])[0]
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # closed early: nobody is left to read a final output
                self._abort(rid, deliver=False)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate replies."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        conversations = [[text_content(m) for m in c] for c in conversations]  # type: ignore[union-attr]
        prompts = [self.tokenizer.apply_chat_template(c, chat_template=chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def abort(self, request_id: str) -> None:
        """Stop a running request and free its KV cache. Its caller (``generate`` or ``generate_async``)
        gets the request's final output, each unfinished sequence ending with finish_reason "abort".
        An unknown or finished id is a no-op."""
        self._abort(request_id, deliver=True)

    def _abort(self, request_id: str, deliver: bool) -> None:
        with self._lock:
            state = self._states.pop(request_id, None)
            sink = self._sinks.pop(request_id, (None, False))[0]
            if state is None:
                return
            state.aborted = True
            sent = state.sent  # if not, _submit tells the engine once it has sent the request
        if sent and self._dead is None and not self._closed:
            self._executor.abort(request_id)
        if deliver and sink is not None:
            state.abort()
            self._deliver([(request_id, sink, state.output())])

    def startup_summary(self) -> str:
        """One line: start-up time and where it went (load, compile, CUDA-graph capture, warm-up steps)."""
        i = self.engine_info
        return (
            f"{self.model_name} on {i['device']} ({i['dtype']}), {i['num_blocks']} KV blocks, "
            f"{self.limits.max_num_tokens} tokens a step; ready in "
            f"{i['startup_seconds']:.1f} s (torch.compile {i.get('compile_seconds', 0.0):.1f} s, "
            f"CUDA graphs {i.get('cuda_graph_capture_seconds', 0.0):.1f} s, "
            f"warm-up steps {i.get('warm_up_seconds', 0.0):.1f} s)"
        )

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults."""
        return SamplingParams(**self._files.sampling_defaults)

    def stats(self) -> EngineStats:
        with self._lock:
            return replace(self._stats)

    def is_alive(self) -> bool:
        return self._dead is None and not self._closed

    @property
    def fatal_error(self) -> str | None:
        """Why the engine loop stopped (its error and traceback text); None while it runs or after a
        clean shutdown."""
        return self._dead

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    # ------------------------------------------------------------------ internals
    def _next_id(self) -> str:
        while (rid := f"req-{next(self._ids)}") in self._states:  # a caller's own id may look like ours
            pass
        return rid

    def _dead_message(self) -> str:
        if self._dead:
            return f"the engine loop stopped: {self._dead}"
        return "this LLM was shut down (shutdown() or the end of its with block); create a new LLM"

    def _prepare(
        self, prompt: PromptType, sp: SamplingParams, validated: bool = False
    ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate one prompt; raise InvalidRequestError before anything is submitted.
        ``validated``: ``sp`` was checked by the caller (``validate_params``)."""
        if not validated:
            validate_params([sp])
        text, ids = prompt_token_ids(prompt, self.tokenizer)
        check_request(ids, sp, self.vocab_size, self.limits.max_batch_size, self.max_seq_len)
        return text, ids, sp

    def _submit(
        self, items: Sequence[tuple[str | None, str | None, list[int], SamplingParams, Sink, bool]]
    ) -> list[str]:
        """Register and send requests: (request id or None for an automatic one, prompt text, token ids,
        params, sink, stream) each; returns their ids. Nothing is registered if a given id is taken."""
        if self._closed or self._dead is not None:
            raise EngineDeadError(self._dead_message())
        states = [RequestState("", text, ids, sp, self.tokenizer) for _, text, ids, sp, _, _ in items]
        with self._lock:
            for rid, *_ in items:
                if rid is not None and rid in self._states:
                    raise InvalidRequestError(f"request id {rid!r} is already running", param="request_id")
            for state, (rid, _, _, _, sink, stream) in zip(states, items, strict=True):
                # automatic ids are drawn here, under the lock, so that no caller's id can take one meanwhile
                state.request_id = rid if rid is not None else self._next_id()
                self._states[state.request_id] = state
                self._sinks[state.request_id] = (sink, stream)
        eos = self.tokenizer.eos_token_ids
        try:
            self._executor.submit(
                *(Request(s.request_id, s.prompt_token_ids, s.params, eos_token_ids=eos,
                          arrival_time=s.metrics.arrival_time) for s in states)
            )  # fmt: skip
        except BaseException:  # (an interrupt while encoding): none of them may be left behind
            self._sent(states)
            for s in states:
                self._abort(s.request_id, deliver=False)
            raise
        self._sent(states)
        return [s.request_id for s in states]

    def _sent(self, states: list[RequestState]) -> None:
        """The engine has these requests now. Those aborted (from another thread) while they were being
        sent are aborted in the engine only now: an abort that reached it first would be lost."""
        with self._lock:
            for s in states:
                s.sent = True
            late = [s.request_id for s in states if s.aborted]
        if self._dead is None and not self._closed:
            for rid in late:
                self._executor.abort(rid)

    def _on_output(self, msg: tuple[Any, ...]) -> None:
        """Called from the executor's thread (or the reader of the worker process)."""
        kind = msg[0]
        if kind == "fatal":
            self._dead = str(msg[1])
            self._fail_all(EngineDeadError(self._dead_message()))
            return
        if kind != "updates":
            return
        deliveries: list[tuple[str, Sink, RequestOutput | Exception]] = []
        with self._lock:
            if msg[2] is not None:  # (a step's updates carry stats only now and then)
                self._stats = msg[2]
            touched: dict[str, RequestState] = {}
            for up in msg[1]:
                state = self._states.get(up.request_id)
                if state is None:
                    continue
                if up.error is not None:
                    err = (
                        InvalidRequestError(up.error, "prompt")
                        if up.rejected
                        else RequestFailedError(up.error)
                    )
                    deliveries.append((up.request_id, self._sinks[up.request_id][0], err))
                    del self._states[up.request_id], self._sinks[up.request_id]
                    touched.pop(up.request_id, None)
                    continue

                def abort_seq(seq_index: int, stop: str, rid: str = up.request_id) -> None:
                    self._executor.abort(rid, seq_index=seq_index, reason="stop", stop_reason=stop)

                state.apply(up, abort_seq)
                touched[up.request_id] = state
            for rid, state in touched.items():
                sink, stream = self._sinks[rid]
                if state.finished:
                    deliveries.append((rid, sink, state.output()))
                    del self._states[rid], self._sinks[rid]
                elif stream:
                    deliveries.append((rid, sink, state.output()))
        self._deliver(deliveries)

    def _deliver(self, deliveries: Sequence[tuple[str, Sink, RequestOutput | Exception]]) -> None:
        """Hand outputs to their callers, outside the lock. A caller that can no longer take one (its event
        loop was closed) loses its request, which is aborted; the engine and every other request go on."""
        for rid, sink, item in deliveries:
            try:
                sink(item)
            except Exception as e:  # noqa: BLE001 - this thread is the engine loop or the pipe's reader
                log.warning("request %s: its output could not be delivered (%s); aborting it", rid, e)
                self._abort(rid, deliver=False)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            deliveries = [(rid, sink, err) for rid, (sink, _) in self._sinks.items()]
            self._states.clear()
            self._sinks.clear()
        self._deliver(deliveries)


def _naming_prompt(err: Exception, index: int, num_prompts: int) -> Exception:
    """``err`` with "prompt N: " before its message when the call had several prompts."""
    if num_prompts > 1 and err.args:
        err.args = (f"prompt {index}: {err.args[0]}", *err.args[1:])
    return err
