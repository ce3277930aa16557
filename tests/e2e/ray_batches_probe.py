"""Drives one RayWorker's ``frame_batches()`` as a Ray driver of its own: ``python ray_batches_probe.py
GCS_ADDRESS CWD`` prints one JSON line of what it saw.  A separate process because Ray reads the loopback
switch (``workers.backends.ray_env``) at import, which a test process that already imported Ray cannot do."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from workers.backends.ray_env import prepare_ray_environment


async def probe(address: str, cwd: str) -> dict[str, Any]:
    from gateway.config import Config
    from workers.backends.ray_backend import RayBackend
    from workers.channel import Kind
    from workers.ops import Op

    backend = RayBackend.from_config(Config(backend="ray", ray_address=address, pool_size=1))
    await asyncio.wait_for(backend.start(), 120)
    try:
        worker = await backend.acquire("load", {}, cwd, session_id="batches")
        worker.send(Op.PROMPT, {"turn_id": "t1", "text": "output_mb=2 chunk_kb=1"})
        sizes: list[int] = []
        kinds_ok = True
        text = 0
        iterator = worker.frame_batches()
        async with asyncio.timeout(120):
            async for batch in iterator:
                kinds_ok = kinds_ok and isinstance(batch, list) and all(f.kind in Kind for f in batch)
                sizes.append(len(batch))
                events = [f for f in batch if f.kind is Kind.EVENT]
                text += sum(len(f.json().get("text", "")) for f in events if f.name == "tool.output")
                if any(f.name == "turn.complete" for f in events):
                    break
        status = await worker.stop()
        after_stop = [len(b) async for b in iterator]
        return {"node": worker.node, "pid": worker.pid, "status_pid": status.pid, "sizes": sizes,
                "kinds_ok": kinds_ok, "text": text, "after_stop": after_stop}
    finally:
        await asyncio.wait_for(backend.close(), 60)


if __name__ == "__main__":
    prepare_ray_environment(sys.argv[1])  # before Ray's import
    print(json.dumps(asyncio.run(probe(sys.argv[1], sys.argv[2]))), flush=True)
