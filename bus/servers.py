"""Where NATS is: one server's URL, or a cluster's, comma-separated (``SANDBOXCTL_NATS_URL``).

nats-py takes a list of servers and fails over between them; a comma-separated string it takes
as one URL. Each URL is checked here, so a typo is named at start instead of surfacing as a
connection that never comes."""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("nats", "tls", "ws", "wss")

# How a connection notices a server that stopped answering (a frozen process, a lost machine) and
# leaves it for another of the cluster's: within PING_INTERVAL * (MAX_PINGS_OUT + 1) seconds, not
# the minutes of nats-py's defaults. Services and the client SDK alike.
PING_INTERVAL = 1.0
MAX_PINGS_OUT = 2


def server_urls(text: str) -> list[str]:
    """The URLs in ``text`` (comma-separated, blanks ignored); ValueError naming the first bad one."""
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise ValueError("no NATS server URL given (SANDBOXCTL_NATS_URL)")
    for url in urls:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"NATS server URL {url!r} has a port that is not a number from 0 to 65535") from None
        if parts.scheme not in SCHEMES or not parts.hostname or port == 0:
            raise ValueError(f"NATS server URL {url!r} is not of the form nats://HOST:PORT")
    return urls
