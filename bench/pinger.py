"""``python -m bench.pinger URL EVERY_S``: a separate process that measures ``gateway.ping`` round trips.

Why a process of its own: a pinger on the benchmark's loop would measure that loop too (64 streams being
received), not only the gateway's.  Protocol on its standard streams: it connects and prints ``READY``;
a line on stdin starts the pings (one every ``EVERY_S`` seconds, not waiting for answers); end of input
stops them; answers still arriving within a second are counted, then it prints one JSON line
``{"rtts": [...], "unanswered": [...], "sent": n}`` (seconds) and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys

from bench.wsclient import BenchClient


async def _main(url: str, every_s: float) -> int:
    client = await BenchClient.open(url)
    loop = asyncio.get_running_loop()
    try:
        print("READY", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        client.start_pinging(every_s)
        await loop.run_in_executor(None, sys.stdin.read)  # until end of input
        stats = await client.stop_pinging(grace_s=1.0)
        print(json.dumps({"rtts": stats.rtts, "unanswered": stats.unanswered, "sent": stats.sent}), flush=True)
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    return asyncio.run(_main(args[0], float(args[1])))


if __name__ == "__main__":
    sys.exit(main())
