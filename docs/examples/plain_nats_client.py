"""Drive sandboxctl from another service with nothing but nats-py and the published contract.

No sandboxctl code is imported: payloads are plain dicts, checked against the
JSON Schemas in docs/asyncapi.json before they are sent, exactly as a service
in another language would do with its own NATS client and schema validator.

    python docs/examples/plain_nats_client.py nats://127.0.0.1:4222 my-sandbox localhost/sandboxctl-busybox:latest
"""

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import jsonschema
import nats

CONTRACT = json.loads((Path(__file__).resolve().parent.parent / "asyncapi.json").read_text())


def check(schema_name: str, payload: dict) -> None:
    """Validate against a schema of the contract, resolving its internal $refs."""
    schema = {**CONTRACT["components"]["schemas"][schema_name], "components": CONTRACT["components"]}
    jsonschema.validate(payload, schema)


async def command(nc, verb: str, payload: dict) -> dict:
    payload = {"type": f"sandboxctl.command.{verb}.v1", "command_id": uuid.uuid4().hex, "actor": "plain", **payload}
    check(f"{verb.capitalize()}Sandbox", payload)
    msg = await nc.request(
        f"sandboxctl.cmd.{verb}",
        json.dumps(payload).encode(),
        timeout=10,
        headers={"Nats-Msg-Id": payload["command_id"]},  # optional: the service dedupes by command_id
    )
    reply = json.loads(msg.data)
    check("Reply", reply)
    return reply


async def wait_for(nc, name: str, phase: str, after_seq: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = json.loads((await nc.request("sandboxctl.query.get", json.dumps({"name": name}).encode())).data)
        item = reply.get("result") or {}
        if item.get("last_seq", 0) >= after_seq and item.get("phase") == phase:
            return item
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} did not reach {phase}")


async def main(url: str, name: str, image: str) -> None:
    nc = await nats.connect(url)
    try:
        reply = await command(nc, "create", {"name": name, "image": image})
        assert reply["accepted"], reply
        print("create", reply["phase"], reply["seq"])
        print("ready", (await wait_for(nc, name, "Ready", reply["seq"]))["phase"])
        reply = await command(nc, "stop", {"name": name})
        print("stop", reply["phase"], (await wait_for(nc, name, "Stopped", reply["seq"]))["phase"])
        reply = await command(nc, "start", {"name": name})
        print("start", reply["phase"], (await wait_for(nc, name, "Ready", reply["seq"]))["phase"])

        # Bad input: each answer carries an error code and a message.
        for label, verb, payload in [
            ("empty name", "stop", {"name": ""}),
            ("unknown driver", "create", {"name": f"{name}-x", "image": image, "driver": "no-such-engine"}),
            ("unknown sandbox", "stop", {"name": f"{name}-nope"}),
            ("existing name", "create", {"name": name, "image": image}),
        ]:
            reply = await command(nc, verb, payload)
            print("error", label, reply["error"]["code"], "-", reply["error"]["message"])
        # A transition the phase does not allow: a sandbox whose image is missing ends in Error,
        # and stop is not allowed there (start is: it is how a failed sandbox is recovered).
        broken = f"{name}-broken"
        reply = await command(nc, "create", {"name": broken, "image": "localhost/no-such-image:none"})
        await wait_for(nc, broken, "Error", reply["seq"])
        reply = await command(nc, "stop", {"name": broken})
        print("error", "not allowed now", reply["error"]["code"], "-", reply["error"]["message"])
        # A malformed payload, published raw (it could never pass the schema check).
        msg = await nc.request("sandboxctl.cmd.stop", b"{not json", timeout=10)
        print("error", "malformed", json.loads(msg.data)["error"]["code"])
        for n in (name, broken):
            await command(nc, "delete", {"name": n})
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
