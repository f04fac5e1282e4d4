"""The FastAPI application: routes, error envelope, middlewares, around one shared engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import kiln
from kiln.serve.chat import create_chat_completion, render_chat
from kiln.serve.completions import create_completion
from kiln.serve.config import ServeConfig
from kiln.serve.engine_client import EngineClient
from kiln.serve.errors import UNAVAILABLE, APIError, bad_request, error_response, install_error_handlers
from kiln.serve.metrics import CONTENT_TYPE, ServerMetrics
from kiln.serve.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from kiln.serve.openai_bridge import check_prompt_ids
from kiln.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from kiln.serve.request_log import log_request, status_loop
from kiln.serve.state import ServerState


def build_state(llm: Any, config: ServeConfig) -> ServerState:
    client = EngineClient(llm, config.max_queued_requests)
    model_name = config.served_model_name or llm.model_name
    metrics = ServerMetrics(llm, model_name, client)
    client.on_finish.append(metrics.observe)
    if config.request_log:
        client.on_finish.append(log_request)
    vocab = getattr(llm, "vocab_size", None) or llm.tokenizer.vocab_size
    return ServerState(
        llm=llm,
        config=config,
        client=client,
        metrics=metrics,
        model_name=model_name,
        max_seq_len=int(llm.max_seq_len),
        vocab_size=int(vocab),
    )


def build_app(llm: Any, config: ServeConfig) -> FastAPI:
    """An app serving ``llm`` (a ``kiln.LLM``); the caller owns the engine and shuts it down."""
    state = build_state(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.client.start()
        status = (
            asyncio.create_task(status_loop(llm, config.log_interval)) if config.log_interval > 0 else None
        )
        try:
            yield
        finally:
            if status is not None:
                status.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await status
            await state.client.stop()
            state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kiln", version=kiln.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kiln = state
    install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)  # outermost: before the body is read
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    def card() -> ModelCard:
        return ModelCard(id=state.model_name, created=int(state.started), max_model_len=state.max_seq_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return card()

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with either
    async def health() -> Response:
        if not state.client.is_alive():
            return error_response(APIError(503, "The engine loop is dead.", UNAVAILABLE, code="engine_dead"))
        if state.client.draining:
            return error_response(
                APIError(503, "The server is shutting down.", UNAVAILABLE, code="server_draining")
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=kiln.__version__)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Send exactly one of 'prompt' or 'messages'.", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages must not be empty.", "messages")
            ids = await state.in_tokenizer_thread(
                render_chat, body.messages, body.add_generation_prompt, state
            )
        else:
            ids = await state.in_tokenizer_thread(
                state.llm.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens
            )
        return TokenizeResponse(count=len(ids), max_model_len=state.max_seq_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.check_model(body.model)
        if body.tokens:
            check_prompt_ids(body.tokens, state.vocab_size, "tokens")
        try:
            text = await state.in_tokenizer_thread(
                state.llm.tokenizer.decode, body.tokens, skip_special_tokens=body.skip_special_tokens
            )
        except Exception as e:  # noqa: BLE001 - ids the tokenizer has no text for
            raise APIError(400, f"Could not decode these tokens: {e}", param="tokens") from None
        return DetokenizeResponse(prompt=text)
