"""`python -m kiln.serve [MODEL] [options]`: the same as `kiln serve`."""

from __future__ import annotations

import sys

from kiln.cli import check_serve_kv_flags, os_error_text
from kiln.serve import main
from kiln.serve.cli_args import build_parser


def _run() -> int:
    args = build_parser("python -m kiln.serve").parse_args()
    try:
        check_serve_kv_flags(args)
        return main(args)
    except (ValueError, RuntimeError) as e:
        print(f"kiln serve: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing weights file: the user's input, as in `kiln serve`
        print(f"kiln serve: error: {os_error_text(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_run())
