"""ServeConfig: what the HTTP layer needs to know, validated once. The one place that reads KILN_API_KEY."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from kiln.sampling_params import SamplingParams

API_KEY_ENV = "KILN_API_KEY"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the engine's model_name
    api_key: str | None = None
    chat_template: str | None = None  # template text (already read from --chat-template FILE)
    max_queued_requests: int = 1024
    max_n: int = 16
    max_logprobs: int = SamplingParams.MAX_LOGPROBS
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_interval: float = 10.0
    request_log: bool = True
    access_log: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        _check(
            self.max_queued_requests >= 1,
            f"--max-queued-requests must be >= 1, got {self.max_queued_requests}",
        )
        _check(self.max_n >= 1, f"--max-n must be >= 1, got {self.max_n}")
        _check(
            0 <= self.max_logprobs <= SamplingParams.MAX_LOGPROBS,
            f"--max-logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}], got {self.max_logprobs}",
        )
        _check(self.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        _check(self.shutdown_timeout >= 0, f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        _check(self.log_interval >= 0, f"--log-interval must be >= 0, got {self.log_interval}")
        _check(self.api_key is None or self.api_key != "", "--api-key must not be empty")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        chat_template = None
        if args.chat_template is not None:
            try:
                with open(args.chat_template, encoding="utf-8") as f:
                    chat_template = f.read()
            except OSError as e:
                raise ValueError(
                    f"--chat-template: cannot read {args.chat_template!r}: {e.strerror}"
                ) from None
        api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        return cls(
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_key=api_key,
            chat_template=chat_template,
            max_queued_requests=args.max_queued_requests,
            max_n=args.max_n,
            max_logprobs=args.max_logprobs,
            max_body_bytes=args.max_body_bytes,
            shutdown_timeout=args.shutdown_timeout,
            log_interval=args.log_interval,
            request_log=not args.no_request_log,
            access_log=args.access_log,
            log_level=args.log_level,
        )
