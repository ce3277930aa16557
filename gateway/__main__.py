"""``worker-gateway`` / ``python -m gateway``: the command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: worker-gateway {serve,loadtest} [options]

commands:
  serve      run the gateway (worker-gateway serve --help lists every flag)
  loadtest   drive a gateway with load-agent sessions and report what was lost
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from gateway.server import serve

        return serve(rest)
    if command == "loadtest":
        try:
            from gateway.loadtest import main as loadtest_main
        except ImportError as exc:
            print(f"worker-gateway: loadtest is unavailable: {exc}", file=sys.stderr)
            return 2
        return loadtest_main(rest)
    print(f"worker-gateway: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
