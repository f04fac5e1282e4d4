"""kiln serve: an OpenAI-compatible HTTP server over one shared engine.

Server-only dependencies (fastapi, uvicorn, pydantic, prometheus_client; the ``serve`` extra) are
imported by the modules of this package only, and only when the server is started.
"""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """Run `kiln serve` with parsed arguments (see ``kiln.serve.cli_args.add_serve_arguments``)."""
    try:
        from kiln.serve.server import main as server_main
    except ImportError as e:
        raise RuntimeError(
            f"kiln serve needs the server dependencies ({e.name} is missing): pip install 'kiln[serve]'"
        ) from None
    return server_main(args)
