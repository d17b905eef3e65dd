"""The cost of fsyncing every JetStream write (``sync_interval: always``).

Runs the same two measurements against a nats-server with the default flush
and one with ``sync_interval: always``: raw JetStream publish-with-ack (one
at a time, and 256 in flight), and sandboxctl creates accepted per second
through the state machine (FakeDriver, so only the control plane is timed).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats

from bench.common import config, parser, save, workdir
from bench.fake_driver import FakeDriver
from sandboxctl.client import SandboxClient
from sandboxctl.runtime.embedded import ControlPlane, NatsServer


async def _raw(url: str, n: int) -> dict[str, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAW", subjects=["raw.>"])
    payload = b"x" * 300
    began = time.perf_counter()
    for i in range(n):
        await js.publish(f"raw.{i % 100}", payload)
    sequential = n / (time.perf_counter() - began)
    began = time.perf_counter()
    sem = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with sem:
            await js.publish(f"raw.{i % 100}", payload)

    await asyncio.gather(*(one(i) for i in range(n)))
    concurrent = n / (time.perf_counter() - began)
    await nc.close()
    return {"raw_sequential_per_s": sequential, "raw_256_in_flight_per_s": concurrent}


async def _sandboxctl(root: Path, url: str, n: int) -> dict[str, float]:
    cfg = config(root, url, {}, drivers=("fake",))
    plane = await ControlPlane(cfg, drivers={"fake": FakeDriver()}).start()
    client = await SandboxClient.connect(url, actor="bench")
    sem = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with sem:
            reply = await client.create(f"d{i}", "img", driver="fake")
            assert reply.accepted

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - began)
    await client.close()
    await plane.stop()
    return {"creates_accepted_per_s": rate}


async def run(quick: bool) -> dict[str, Any]:
    n = 200 if quick else 4000
    out: dict[str, Any] = {}
    for mode, sync in (("default_flush", False), ("sync_always", True)):
        with workdir() as root:
            server = NatsServer(root / "nats", sync_always=sync).start()
            try:
                out[mode] = {**await _raw(server.url, n), **await _sandboxctl(root, server.url, n)}
            finally:
                server.stop()
    for key in out["default_flush"]:
        out.setdefault("cost_ratio_always_to_default", {})[key] = out["sync_always"][key] / out["default_flush"][key]
    return out


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    result = asyncio.run(run(args.quick))
    save(
        "durability",
        {
            "title": "Durability: fsync every write",
            "summary": "Raw JetStream publish and sandboxctl creates accepted per second, default flush against "
            "sync_interval: always, same machine and run. The ratio is the price of fsync on every append.",
            **result,
        },
        args.quick,
    )


if __name__ == "__main__":
    main()
