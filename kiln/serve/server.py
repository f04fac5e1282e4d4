"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

Drain: new requests get 503 (and /health too), in-flight requests run on for up to
``shutdown_timeout`` seconds, then the rest end with finish_reason "abort"; then uvicorn closes the
connections and the engine shuts down. The process exits with status 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from kiln.serve.app import build_app
from kiln.serve.config import ServeConfig
from kiln.serve.engine_client import EngineClient

logger = logging.getLogger("kiln.serve")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, client: EngineClient, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._client = client
        self._shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Replaces uvicorn's handlers, which stop accepting connections at once and re-raise the signal
        # at exit (a non-zero status). Ours drain first and exit cleanly.
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain_task is None:
            logger.info(
                "%s: draining (%d requests in flight, up to %.1fs); new requests get 503",
                signal.Signals(sig).name,
                self._client.num_in_flight,
                self._shutdown_timeout,
            )
            self._drain_task = asyncio.ensure_future(self._drain())
        elif sig == signal.SIGINT:
            logger.warning("second SIGINT: aborting every request and exiting now")
            self._client.abort_all()
            self.should_exit = True

    async def _drain(self) -> None:
        self._client.draining = True
        if not await self._client.wait_idle(self._shutdown_timeout):
            n = self._client.abort_all()
            logger.warning("shutdown timeout: aborted %d requests still in flight", n)
            await self._client.wait_idle(5.0)  # their handlers send the final "abort" chunks
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"cannot bind {host}:{port}: {e.strerror}; pick another --port or --host"
        ) from None
    return sock


def serve(llm: Any, config: ServeConfig, sock: socket.socket | None = None) -> int:
    """Serve ``llm`` until SIGTERM / SIGINT; the caller shuts the engine down afterwards.

    ``sock``: a socket already bound (by ``bind_socket``); by default one is bound to config.host:port.
    """
    app = build_app(llm, config)
    client: EngineClient = app.state.kiln.client
    sock = sock or bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    uv_config = uvicorn.Config(
        app,
        log_config=None,
        log_level=config.log_level,
        access_log=config.access_log,
        timeout_graceful_shutdown=5,
        lifespan="on",
        server_header=False,
    )
    server = _DrainingServer(uv_config, client, config.shutdown_timeout)
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "serving %s on http://%s:%d (Ctrl+C or SIGTERM to stop)", app.state.kiln.model_name, shown, port
    )
    if not config.api_key and not ipaddress.ip_address(host).is_loopback:
        logger.warning("listening on %s without --api-key: anyone who reaches it can use the model", host)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=_LOG_FORMAT)
    logging.getLogger("kiln").setLevel(level.upper())
    logging.getLogger("uvicorn").setLevel(level.upper())


def main(args: argparse.Namespace) -> int:
    """Entry of `kiln serve` and `python -m kiln.serve`: load the engine, serve, shut down."""
    config = ServeConfig.from_args(args)
    setup_logging(config.log_level)
    sock = bind_socket(config.host, config.port)  # a taken port fails now, not after loading the model
    try:
        llm = _build_engine(args)
    except BaseException:
        sock.close()
        raise
    try:
        return serve(llm, config, sock)
    finally:
        llm.shutdown()
        logger.info("engine shut down; bye")


def _build_engine(args: argparse.Namespace) -> Any:
    from kiln import LLM
    from kiln.builder.engine_dir import EnginePlan, is_engine_dir
    from kiln.config import KvCacheConfig, SchedulerConfig
    from kiln.executor.gc_policy import freeze_startup_objects

    # a built engine fixes its KV block size; a checkpoint gets the default
    tokens_per_block = (
        EnginePlan.load(args.model).tokens_per_block if args.model and is_engine_dir(args.model) else 32
    )
    llm = LLM(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        kv_cache_config=KvCacheConfig(
            free_gpu_memory_fraction=args.kv_cache_free_memory_fraction,
            max_tokens=args.kv_cache_max_tokens,
            enable_block_reuse=not args.no_prefix_caching,
            tokens_per_block=tokens_per_block,
        ),
        scheduler_config=SchedulerConfig(policy=args.scheduler_policy),
        seed=args.seed,
        executor=args.executor,
    )
    logger.info("engine ready: %s", llm.startup_summary())
    freeze_startup_objects()  # full collections then scan only the requests' objects
    return llm
