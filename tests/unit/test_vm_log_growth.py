"""How a boot sees the guest's ready marker: the serial log's new bytes, read as qemu writes them
(inotify), with no poll between the write and the look."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from sandboxctl.drivers.vm import machine
from sandboxctl.drivers.vm.machine import Growth


def append(log: Path, data: bytes) -> None:
    with log.open("ab") as f:
        f.write(data)


def test_read_gives_what_was_written_since_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"the last boot's lines\n")
    growth = Growth(log, offset=log.stat().st_size)
    try:
        assert growth.read() == b""
        append(log, b"sandboxctl-ready ab")
        assert growth.read() == b"sandboxctl-ready ab"
        append(log, b"cd\n")
        assert growth.read() == b"cd\n"
        assert growth.read() == b""
    finally:
        growth.close()


def test_lines_give_what_is_new_from_the_start_of_the_line_it_continues(tmp_path: Path) -> None:
    """A marker written a byte at a time is whole in one look, and no line is looked at twice
    once it has ended (a boot's scan costs what was written, not the whole log each time)."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    growth = Growth(log, offset=0)
    try:
        append(log, b"kernel line\nsandboxctl-rea")
        assert growth.lines() == b"kernel line\nsandboxctl-rea"
        append(log, b"dy ab")
        assert growth.lines() == b"sandboxctl-ready ab"
        append(log, b"cd\nnext")
        assert growth.lines() == b"sandboxctl-ready abcd\nnext"
        assert growth.lines() == b"next"
        append(log, b"x" * (3 * Growth.PARTIAL_MAX))
        growth.lines()
        assert len(growth.lines()) == Growth.PARTIAL_MAX  # an endless line is not scanned whole again
    finally:
        growth.close()


def test_read_of_a_log_not_made_yet_is_empty_until_it_is(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    growth = Growth(log, offset=0)
    try:
        assert growth.read() == b""
        log.write_bytes(b"first line\n")
        assert growth.read() == b"first line\n"
    finally:
        growth.close()


def test_wait_wakes_when_the_log_is_written_and_sleeps_while_it_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine, "READY_LOOK", 60.0)  # no look at the deadline to wake it meanwhile
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    growth = Growth(log, offset=0)
    pidfd = os.pidfd_open(os.getpid())  # a process that does not end while the test runs
    try:
        began = time.monotonic()
        growth.wait(pidfd, 0.4)
        assert time.monotonic() - began >= 0.35  # nothing written: no busy look at the file

        def write() -> None:
            time.sleep(0.2)
            append(log, b"sandboxctl-ready 0123\n")

        writer = threading.Thread(target=write)
        began = time.monotonic()
        writer.start()
        growth.wait(pidfd, 30.0)
        woke = time.monotonic() - began
        writer.join()
        assert woke < 5.0, f"the write did not wake the wait ({woke:.1f} s)"
        assert growth.read() == b"sandboxctl-ready 0123\n"
    finally:
        os.close(pidfd)
        growth.close()


def test_close_lets_go_of_both_descriptors(tmp_path: Path) -> None:
    """The inotify descriptor is closed on a thread of its own (its close waits for the kernel):
    closed all the same, so boot after boot leaks none."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        growth = Growth(log, offset=0)
        growth.read()
        growth.close()
    deadline = time.monotonic() + 10
    while set(os.listdir("/proc/self/fd")) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(os.listdir("/proc/self/fd")) - before


def test_a_log_grown_past_its_bound_is_cut_to_its_last_half_at_a_lines_start(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    lines = [b"line %04d\n" % i for i in range(1000)]  # 10 bytes each
    log.write_bytes(b"".join(lines))
    machine.trim_log(log, keep=20_000)
    assert log.read_bytes() == b"".join(lines)  # within its bound: untouched
    machine.trim_log(log, keep=4_005)
    kept = log.read_bytes()
    assert kept == b"".join(lines[-200:])  # the last 2002 bytes, from the first whole line: 200 lines
    machine.trim_log(tmp_path / "none.log")  # no log yet: nothing to do


def test_a_tail_reads_the_last_lines_from_the_end_and_says_where_it_ended(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    assert machine.log_tail(log, 5) == (b"", 0)
    body = b"".join(b"line %06d\n" % i for i in range(20_000))  # 240 KB: several blocks
    append(log, body + b"unfinished")
    size = log.stat().st_size
    assert machine.log_tail(log, 2) == (b"line 019999\nunfinished", size)
    assert machine.log_tail(log, 8000) == (b"".join(body.splitlines(keepends=True)[-7999:]) + b"unfinished", size)
    assert machine.log_tail(log, 0) == (b"", size)
    assert machine.log_tail(log, None) == (body + b"unfinished", size)
    assert machine.log_tail(log, 10**9)[0] == body + b"unfinished"
    append(log, b"\n")
    assert machine.log_tail(log, 1)[0] == b"unfinished\n"
