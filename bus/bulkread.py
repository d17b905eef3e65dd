"""A reader process for catching up on a long stretch of the log.

A service far behind the log (a projector rebuilding, a state machine folding it at start)
is bound by CPU, and on one interpreter reading and folding take turns on one core. Run as
``python -m sandboxctl.bus.bulkread``, this process does only the reading (an ephemeral push
consumer with flow control, delivered to a plain callback) and writes what it read to stdout
in frames, so the service folds on the other core while the next messages arrive. It needs
no permission beyond what the service's ordinary reader (bus/tail.py) has. ``Frames`` is the
service's side: it starts the process and yields its frames.

A frame is a 4-byte big-endian length and a msgpack array
``[last_sequence, [payload, ...], [name, ...]]``: consecutive messages in stream order, the
last of them at ``last_sequence``, with the last token of each one's subject (the sandbox it
was appended for: readers check it against the entry). The process exits 0 once it has
written the message at the last sequence it was asked for, and non-zero (with the reason on
stderr) on any failure, when no message has arrived for ``IDLE`` seconds, or when the
service that started it has gone. The service then goes on from what it has folded with its
ordinary reader, so a failure here only costs speed.

Connection settings come in the environment (``READER_ENV``, JSON), never on the command
line, where other users of the machine could read a password.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import sys
import time
from types import TracebackType
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from sandboxctl.bus.natsinternals import inbox_prefix
from sandboxctl.bus.streams import push_consumer
from sandboxctl.bus.tail import flow_control_reply, sequences

READER_ENV = "SANDBOXCTL_BULKREAD_CONNECT"
HEARTBEAT = 1.0
FRAME = 2_000  # messages per frame written to the service
IDLE = 10.0
CONNECT = 3.0
# A service this far behind the log at start catches up through a reader process: below it,
# starting one costs more than it saves.
BULK_BEHIND = 20_000


def connect_options(nc: NATS) -> dict[str, Any]:
    """The reader process's nats.connect options: the service's own server, user and inboxes."""
    url = nc.connected_url
    options: dict[str, Any] = {"servers": [url.geturl()] if url else []}
    for key in ("user", "password", "token"):
        if nc.options.get(key):
            options[key] = nc.options[key]
    if inbox_prefix(nc):
        options["inbox_prefix"] = inbox_prefix(nc)
    return options


class Frames:
    """A reader process for stream positions ``first`` to ``last``, as an async iterator of
    ``(last_sequence, [payload, ...], [name, ...])`` frames in stream order.

    Iteration ends when the reader has delivered ``last``, or early when it fails or
    writes nonsense; then ``last_read`` says how far it got and ``error`` why it
    stopped. Use it as an async context manager: leaving lets a finished reader delete
    its consumer, and kills one that has not finished."""

    def __init__(self, nc: NATS, stream: str, subject: str, first: int, last: int) -> None:
        self.nc, self.stream, self.subject = nc, stream, subject
        self.first, self.last = first, last
        self.last_read = first - 1
        self.error = ""
        self._decode = msgspec.msgpack.Decoder(tuple[int, list[bytes], list[str]]).decode
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Frames:
        try:
            self._proc = await self._start()
        except OSError as exc:  # no process, no frames: the service reads on with its own reader
            self.error = f"cannot start the reader: {exc!r}"
        return self

    async def _start(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandboxctl.bus.bulkread",
            self.stream,
            self.subject,
            str(self.first),
            str(self.last),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, READER_ENV: json.dumps(connect_options(self.nc))},
            limit=1 << 22,
        )

    def __aiter__(self) -> Frames:
        return self

    async def __anext__(self) -> tuple[int, list[bytes], list[str]]:
        if self._proc is None or self.last_read >= self.last:
            raise StopAsyncIteration
        assert self._proc.stdout is not None
        try:
            size = int.from_bytes(await self._proc.stdout.readexactly(4), "big")
            last, payloads, names = self._decode(await self._proc.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, msgspec.DecodeError, msgspec.ValidationError):
            raise StopAsyncIteration from None  # the reader ended or wrote nonsense: it is only a faster way
        if last != self.last_read + len(payloads) or not payloads or len(names) != len(payloads):
            raise StopAsyncIteration
        self.last_read = last
        return last, payloads, names

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stderr is not None
        if proc.returncode is None and self.last_read >= self.last:
            try:  # it deletes its consumer on the way out
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                pass
        if proc.returncode is None:
            proc.kill()
        self.error = (await proc.stderr.read()).decode(errors="replace").strip()
        await proc.wait()


async def read(connect: dict[str, Any], stream: str, subject: str, first: int, last: int) -> None:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    try:  # nats-py retries a refused first connect for ever
        nc = await asyncio.wait_for(nats.connect(**connect, allow_reconnect=False, error_cb=on_error), CONNECT)
    except TimeoutError:
        raise RuntimeError(f"cannot connect: {errors[-1] if errors else 'timed out'}") from None
    js = nc.jetstream()
    out = sys.stdout.buffer
    try:  # a bigger pipe lets a whole frame wait there while the service folds the last one
        fcntl.fcntl(out.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    inbox = nc.new_inbox()
    frame: list[bytes] = []
    names: list[str] = []
    failure: list[str] = []
    seen = 0
    done = asyncio.Event()
    encode = msgspec.msgpack.Encoder().encode

    def flush(last_seq: int) -> None:
        body = encode((last_seq, frame, names))
        frame.clear()
        names.clear()
        try:
            out.write(len(body).to_bytes(4, "big"))
            out.write(body)
        except OSError as exc:  # the service went away (nats-py would swallow this in a callback)
            failure.append(f"cannot write to the service: {exc!r}")
            done.set()

    async def on_msg(msg: Msg) -> None:
        nonlocal seen
        if not msg.data:  # flow control (answered at once: the pipe is the backpressure) or a heartbeat
            reply = flow_control_reply(msg)
            if reply:
                await nc.publish(reply, b"")
            return
        if done.is_set():
            return
        # The log is never deleted from, so the n-th message delivered is sequence first + n - 1.
        # The reply subject says so once a frame; a message lost on the way shows there as a
        # delivery count ahead of ours, and the service reads on from the last good frame.
        frame.append(msg.data)
        names.append(msg.subject.rpartition(".")[2])
        seen += 1
        if len(frame) >= FRAME or seen + first > last:
            seq, delivered = sequences(msg.reply)
            if delivered != seen or seq != first + seen - 1:
                failure.append(f"message {delivered} (sequence {seq}) arrived as the {seen}th")
                done.set()
                return
            flush(seq)
            if seq >= last:
                done.set()

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
    info = None
    try:
        info = await js.add_consumer(stream, config=push_consumer(subject, first, inbox, HEARTBEAT, 60.0))
        # Progress is counted in messages read (heartbeats keep coming from a consumer that
        # delivers nothing), and the reader never outlives the service it reads for.
        parent, last_seen, progressed = os.getppid(), -1, time.monotonic()
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except TimeoutError:
                pass
            if os.getppid() != parent:
                raise RuntimeError("the service went away")
            if errors:
                raise RuntimeError(f"connection failed: {errors[-1]!r}")
            if seen != last_seen:
                last_seen, progressed = seen, time.monotonic()
            elif time.monotonic() - progressed > IDLE:
                raise RuntimeError(f"no message for {IDLE:g}s after {seen} messages")
        if failure:
            raise RuntimeError(failure[0])
        out.flush()
    finally:
        await sub.unsubscribe()
        try:
            if info is not None:
                await js.delete_consumer(stream, info.name)
        finally:
            await nc.close()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("stream")
    args.add_argument("subject")
    args.add_argument("first", type=int)
    args.add_argument("last", type=int)
    opts = args.parse_args()
    connect = json.loads(os.environ.get(READER_ENV, "{}"))
    try:
        asyncio.run(read(connect, opts.stream, opts.subject, opts.first, opts.last))
    except BrokenPipeError:
        sys.exit(1)  # the service went away
    except Exception as exc:
        print(f"bulkread: {exc!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
