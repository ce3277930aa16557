"""A stand-in gateway for test_parent_death: owns a Supervisor, starts two busy workers (one leaving
background processes, one holding the GIL in a regex), prints their pids as JSON, then waits to be
killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json

from support import async_wait_for

from workers.supervisor import Supervisor


async def main() -> None:
    sup = Supervisor(pool_size=1, watchdog_poll_s=0.5)
    await sup.start()
    shell = await sup.acquire("shell", {}, None, "shell-session")
    shell.send("prompt", {"turn_id": "t1", "text": "sleep 300 & sleep 301"})
    regex = await sup.acquire("load", {}, None, "regex-session")
    regex.send("prompt", {"turn_id": "t1", "text": "gil=regex cpu_s=60"})
    for handle in (shell, regex):
        frame = await anext(handle.frames())
        assert frame.name == "turn.start", frame
    await async_wait_for(lambda: sup.pool_ready >= 1, 30, what="a warm worker in the pool")
    pooled = [w.pid for w in sup._pool]
    print(json.dumps({"shell": shell.pid, "regex": regex.pid, "pool": pooled}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
