"""Where a process serves its metrics: the setting, read and checked without importing the
metrics library (the command line reads settings on every call, and serves nothing)."""

from __future__ import annotations

ENV = "SANDBOXCTL_METRICS"  # host:port of the scrape endpoint; "off" for none
DEFAULT_ADDRESS = "127.0.0.1:0"  # a free port, printed: several processes on one host never collide
OFF = "off"


def parse_address(address: str, what: str = "metrics address") -> tuple[str, int] | None:
    """``host:port`` (port 0: a free one) as (host, port); None for ``off``. ValueError, saying
    what is wrong (``what``: the setting's name), for anything else."""
    text = address.strip()
    if text.lower() == OFF:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
        raise ValueError(f"{what} {address[:100]!r}: give host:port (port 0 for a free one), or {OFF}")
    return host.strip("[]"), int(port_text)
