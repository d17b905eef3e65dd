"""Settings, read from the environment so every process agrees without flags.

Defaults are the embedded ones used by ``sandboxctl up``: a local nats-server
on 4222, data under the user's data directory, podman on a socket of our own.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sandboxctl.auth import load_credentials, local_user_name
from sandboxctl.bus.servers import server_urls
from sandboxctl.events.hosts import HEARTBEAT_DEFAULT, HEARTBEAT_MAX, HEARTBEAT_MIN
from sandboxctl.events.limits import (
    CPUS_MAX,
    HOST_MAX,
    HOST_PATTERN,
    HOST_SANDBOXES_MAX,
    LABEL_KEY_MAX,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_MAX,
    LABELS_MAX,
    MEMORY_MAX,
    MEMORY_MIN,
    SNAPSHOT_EVERY,
)
from sandboxctl.observe import address as metrics_address
from sandboxctl.runtime.paths import default_data_dir, default_run_dir, run_dir
from sandboxctl.statemachine.deadlines import parse_deadlines
from sandboxctl.statemachine.phases import Phase

# Failures of one service or process within RESTART_WINDOW seconds that are restarted in place;
# one more, and the process gives up (exits non-zero) for an outer supervisor to take over.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0

# Seconds the engine may take to answer each request that sets up an exec or a log stream (not the
# command's run time): a paused or wedged engine is then a one-line error instead of a hang.
ANSWER_TIMEOUT = 30.0

# Seconds a CLI call that exports traces may spend sending its spans at exit (observe.tracing):
# with its collector away, the call ends that much later, never the OpenTelemetry SDK's 10 s.
TRACE_EXPORT_WAIT = 2.0
# The same for up and serve as they stop: the spans of their last moments, not a long wait.
SERVICE_TRACE_EXPORT_WAIT = 5.0


# The web console's address (cli/console.py): a port of its own, printed by up and serve, so
# a bookmark keeps working; port 0 takes a free one, "off" serves none.
CONSOLE_ENV = "SANDBOXCTL_CONSOLE"
CONSOLE_DEFAULT = "127.0.0.1:4280"  # up's
# serve's: a free port, printed, so that several serve processes (and an up) on one host never
# contend for one (as the metrics' endpoints do).
CONSOLE_SERVE_DEFAULT = "127.0.0.1:0"
CONSOLE_WHAT = "console address"

HOST_MAX_SANDBOXES = 256  # a host's most sandboxes unless SANDBOXCTL_HOST_MAX_SANDBOXES says otherwise


@dataclass
class Config:
    nats_url: str = "nats://127.0.0.1:4222"
    # Where up and serve serve their Prometheus metrics: host:port (port 0: a free one, printed), or "off".
    metrics: str = metrics_address.DEFAULT_ADDRESS
    # Where up and serve serve the web console (cli/console.py): host:port, or "off". Off
    # unless asked for here; the command line's default is CONSOLE_DEFAULT (from_env).
    console: str = metrics_address.OFF
    data_dir: Path = field(default_factory=default_data_dir)
    run_dir: Path = field(default_factory=default_run_dir)
    podman_url: str = ""
    docker_url: str = ""
    # Empty means: whichever engines answer when the services start (see embedded.detect_drivers).
    drivers: tuple[str, ...] = ()
    default_driver: str = ""
    actor: str = ""
    # What boot reconciliation does with a Ready sandbox whose container exited
    # while nobody watched (the engine was down): "restart" it, or mark it "error".
    reconcile_exited: str = "restart"
    # Deadlines of the transient phases, per driver ("*" for all): SANDBOXCTL_DEADLINES="podman.Stopping=60".
    deadlines: dict[str, dict[Phase, float]] = field(default_factory=dict)
    # Durability (docs/durability.md): fsync every JetStream write in the embedded server, and
    # the replica count of the streams when the NATS servers are clustered.
    sync_always: bool = False
    replicas: int | None = None  # of every stream; None: 3 on a cluster, 1 on a single server
    # Authorization (docs/security.md). auth_dir holds users.json, the generated server.conf and one
    # credential file per user; when users.json exists the services authenticate and check roles.
    auth_dir: Path | None = None
    # The client's own NATS user: from SANDBOXCTL_CREDENTIALS (a file), SANDBOXCTL_USER and
    # SANDBOXCTL_PASSWORD, or the credential `sandboxctl up` made for the local user.
    user: str = ""
    password: str = ""
    # Idleness (docs/architecture.md): a create's idle_timeout when it names none, in seconds (0:
    # never auto-stopped), the grace period the reaper's warnings give, and how often it looks.
    idle_timeout: float = 0.0
    idle_grace: float = 60.0
    reaper_interval: float = 1.0
    # The webhooks' relay (services/webhooks.py): tries per delivery before it is dead-lettered,
    # the first wait between tries (doubling up to webhook_backoff_max), and each try's timeout.
    webhook_attempts: int = 6
    webhook_backoff: float = 0.5
    webhook_backoff_max: float = 10.0
    webhook_timeout: float = 5.0
    # The state machine writes its snapshot once the log has grown this many entries past the last.
    snapshot_every: int = SNAPSHOT_EVERY
    # Supervision (runtime/supervise.py): a service or a process sandboxctl runs that fails more
    # than restart_limit times within restart_window seconds makes the process exit non-zero, for
    # an outer supervisor (systemd, a container runtime) to restart it whole; 0 never gives up.
    # None is the command's own default: `up`, which nothing supervises, never gives up and keeps
    # retrying with backoff (a full disk may last); `serve` gives up after RESTART_LIMIT.
    restart_limit: int | None = None
    restart_window: float = RESTART_WINDOW
    # The host this process's driver workers announce (runtime/host.py): its name (a subject
    # token; default the machine's hostname), labels, capacity, and the heartbeat window after
    # which it is lost.
    host: str = field(default_factory=lambda: default_host_name())
    host_labels: dict[str, str] = field(default_factory=dict)
    host_cpus: float = 0.0  # 0: the machine's
    host_memory: int = 0  # bytes; 0: the machine's
    host_max_sandboxes: int = HOST_MAX_SANDBOXES
    heartbeat: float = HEARTBEAT_DEFAULT
    # The vm driver (docs/vm.md): the guest kernel and initramfs scripts/setup-vm.sh made (None:
    # drivers.vm.machine.default_guest_dir), and the acceleration ("" or "auto": KVM where the CPU
    # has hardware virtualisation, TCG otherwise; "kvm" or "tcg" to choose).
    vm_guest_dir: Path | None = None
    vm_acceleration: str = ""

    @property
    def vm_dir(self) -> Path:
        """Where the vm driver keeps every VM's files (one directory per sandbox id) and the images' root disks."""
        return self.data_dir / "vm"

    @property
    def restarts_allowed(self) -> int:
        return RESTART_LIMIT if self.restart_limit is None else self.restart_limit

    @property
    def projection_path(self) -> Path:
        return self.data_dir / "projection.sqlite3"

    @property
    def lock_path(self) -> Path:
        """Held by the one ``sandboxctl up`` running on this data directory."""
        return self.data_dir / "up.lock"

    @property
    def auth_path(self) -> Path:
        return self.auth_dir or self.data_dir / "auth"

    @property
    def podman_socket_url(self) -> str:
        return self.podman_url or f"unix://{self.run_dir / 'podman.sock'}"

    @property
    def docker_socket_url(self) -> str:
        return self.docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        cfg = cls()
        cfg.nats_url = env.get("SANDBOXCTL_NATS_URL", cfg.nats_url)
        server_urls(cfg.nats_url)  # one URL or a cluster's, comma-separated: each checked
        if "SANDBOXCTL_DATA_DIR" in env:
            cfg.data_dir = Path(env["SANDBOXCTL_DATA_DIR"])
        cfg.run_dir = run_dir(env)
        cfg.podman_url = env.get("SANDBOXCTL_PODMAN_URL", "")
        cfg.metrics = env.get(metrics_address.ENV, "").strip() or cfg.metrics
        metrics_address.parse_address(cfg.metrics)  # ValueError, saying what is wrong
        cfg.console = env.get(CONSOLE_ENV, "").strip() or CONSOLE_DEFAULT
        metrics_address.parse_address(cfg.console, CONSOLE_WHAT)
        if env.get("SANDBOXCTL_VM_GUEST"):
            cfg.vm_guest_dir = Path(env["SANDBOXCTL_VM_GUEST"])
        cfg.vm_acceleration = env.get("SANDBOXCTL_VM_ACCEL", "").strip().lower()
        if cfg.vm_acceleration not in ("", "auto", "kvm", "tcg"):
            raise ValueError(f"SANDBOXCTL_VM_ACCEL must be auto, kvm or tcg, not {cfg.vm_acceleration[:20]!r}")
        cfg.docker_url = env.get("SANDBOXCTL_DOCKER_URL", "")
        if "SANDBOXCTL_DRIVERS" in env:
            cfg.drivers = tuple(d.strip() for d in env["SANDBOXCTL_DRIVERS"].split(",") if d.strip())
        cfg.default_driver = env.get("SANDBOXCTL_DEFAULT_DRIVER", cfg.drivers[0] if cfg.drivers else "")
        cfg.actor = env.get("SANDBOXCTL_ACTOR") or env.get("USER") or "cli"
        cfg.reconcile_exited = env.get("SANDBOXCTL_RECONCILE_EXITED", cfg.reconcile_exited)
        cfg.deadlines = parse_deadlines(env.get("SANDBOXCTL_DEADLINES", ""))
        cfg.sync_always = env.get("SANDBOXCTL_SYNC_ALWAYS", "").lower() in ("1", "true", "yes")
        cfg.replicas = _bounded(env, "SANDBOXCTL_REPLICAS", 1, 5, "JetStream's most")
        cfg.snapshot_every = _bounded(env, "SANDBOXCTL_SNAPSHOT_EVERY", 1, 10**9) or cfg.snapshot_every
        if "SANDBOXCTL_AUTH_DIR" in env:
            cfg.auth_dir = Path(env["SANDBOXCTL_AUTH_DIR"])
        cfg.user, cfg.password = _credentials(env, cfg.auth_path)
        cfg.idle_timeout = parse_duration(env.get("SANDBOXCTL_IDLE_TIMEOUT", "0"))
        cfg.idle_grace = parse_duration(env.get("SANDBOXCTL_IDLE_GRACE", "60"))
        cfg.webhook_attempts = _bounded(env, "SANDBOXCTL_WEBHOOK_ATTEMPTS", 1, 100) or cfg.webhook_attempts
        for key, attribute in (
            ("SANDBOXCTL_WEBHOOK_BACKOFF", "webhook_backoff"),
            ("SANDBOXCTL_WEBHOOK_BACKOFF_MAX", "webhook_backoff_max"),
            ("SANDBOXCTL_WEBHOOK_TIMEOUT", "webhook_timeout"),
        ):
            if env.get(key, "").strip():
                seconds = parse_duration(env[key])
                if not 0 < seconds <= 300:
                    raise ValueError(f"{key} must be above 0 and at most 5m, not {env[key]!r}")
                setattr(cfg, attribute, seconds)
        if "SANDBOXCTL_RESTART_LIMIT" in env:
            cfg.restart_limit = max(0, int(env["SANDBOXCTL_RESTART_LIMIT"]))
        if "SANDBOXCTL_RESTART_WINDOW" in env:
            cfg.restart_window = parse_duration(env["SANDBOXCTL_RESTART_WINDOW"])
        cfg.host = env.get("SANDBOXCTL_HOST", "") or default_host_name()
        if not _HOST.fullmatch(cfg.host):
            raise ValueError(
                f"SANDBOXCTL_HOST {cfg.host[:80]!r}: 1-63 letters, digits, '-' or '_', starting with a letter or digit"
            )
        cfg.host_labels = parse_labels(env.get("SANDBOXCTL_HOST_LABELS", ""), "SANDBOXCTL_HOST_LABELS")
        if env.get("SANDBOXCTL_HOST_CPUS", "").strip():
            try:
                cfg.host_cpus = float(env["SANDBOXCTL_HOST_CPUS"])
            except ValueError:
                cfg.host_cpus = -1.0
            if not (math.isfinite(cfg.host_cpus) and 0 < cfg.host_cpus <= CPUS_MAX * 64):
                raise ValueError(
                    f"SANDBOXCTL_HOST_CPUS must be a number of CPUs above 0, not {env['SANDBOXCTL_HOST_CPUS']!r}"
                )
        if env.get("SANDBOXCTL_HOST_MEMORY", "").strip():
            cfg.host_memory = parse_size(env["SANDBOXCTL_HOST_MEMORY"], "SANDBOXCTL_HOST_MEMORY")
            if not MEMORY_MIN <= cfg.host_memory <= MEMORY_MAX * 64:
                raise ValueError(f"SANDBOXCTL_HOST_MEMORY must be from {MEMORY_MIN} bytes to {MEMORY_MAX * 64} bytes")
        cfg.host_max_sandboxes = (
            _bounded(env, "SANDBOXCTL_HOST_MAX_SANDBOXES", 1, HOST_SANDBOXES_MAX) or cfg.host_max_sandboxes
        )
        if env.get("SANDBOXCTL_HOST_HEARTBEAT", "").strip():
            cfg.heartbeat = parse_duration(env["SANDBOXCTL_HOST_HEARTBEAT"])
            if not HEARTBEAT_MIN <= cfg.heartbeat <= HEARTBEAT_MAX:
                raise ValueError(f"SANDBOXCTL_HOST_HEARTBEAT must be from {HEARTBEAT_MIN:g}s to {HEARTBEAT_MAX:g}s")
        if cfg.reconcile_exited not in ("restart", "error"):
            raise ValueError(f"SANDBOXCTL_RECONCILE_EXITED must be restart or error, not {cfg.reconcile_exited!r}")
        return cfg


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``, ``7d`` or a sum like ``1h30m``."""
    spec = text.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(spec):
        if match.start() != pos or (match.group(2) == "" and match.end() != len(spec)):
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if not spec or pos != len(spec) or not math.isfinite(total):
        raise ValueError(f"bad duration {text!r}: use seconds or a number with s, m, h or d, e.g. 10m")
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, what: str) -> int:
    """Bytes from ``512m``, ``1g``, ``1.5g`` or ``268435456`` (units of 1024: b, k, m, g, t), as
    docker's ``--memory`` reads them."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"{what} {text[:40]!r}: a size such as 512m or 2g (units b, k, m, g, t)")
    return math.floor(float(found.group(1)) * SIZE_UNITS[found.group(2).lower()])


_HOST = re.compile(HOST_PATTERN)
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def labels_from_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as labels, within events/limits.py's bounds; ValueError says which is wrong."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair[:80]!r} is not KEY=VALUE")
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key[:80]!r}: 1-{LABEL_KEY_MAX} letters, digits, '.', '_', '/' or '-', "
                "starting with a letter or digit"
            )
        if len(value) > LABEL_VALUE_MAX:
            raise ValueError(f"label {key}: the value is longer than {LABEL_VALUE_MAX}")
        if key in labels:
            raise ValueError(f"label {key} is given twice")
        labels[key] = value
    if len(labels) > LABELS_MAX:
        raise ValueError(f"{len(labels)} labels: at most {LABELS_MAX}")
    return labels


def parse_labels(text: str, what: str) -> dict[str, str]:
    """``zone=a,gpu=none`` from the environment setting ``what``."""
    try:
        return labels_from_pairs(part.strip() for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def default_host_name() -> str:
    """The machine's hostname as a host name: its first label, with what a subject token cannot
    hold replaced by '-'."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:HOST_MAX].strip("-_")
    return name or "localhost"


def _credentials(env: dict[str, str], auth_dir: Path) -> tuple[str, str]:
    """The client's NATS user and password: an explicit file, then the environment, then the
    admin credential ``sandboxctl up`` wrote for the local user, else none (no authentication)."""
    if env.get("SANDBOXCTL_CREDENTIALS"):
        creds = load_credentials(Path(env["SANDBOXCTL_CREDENTIALS"]))
        return creds.user, creds.password
    if env.get("SANDBOXCTL_USER"):
        return env["SANDBOXCTL_USER"], env.get("SANDBOXCTL_PASSWORD", "")
    local = auth_dir / "credentials" / f"{local_user_name(env)}.json"
    try:
        creds = load_credentials(local)
    except OSError:
        return "", ""
    return creds.user, creds.password


def _bounded(env: dict[str, str], key: str, low: int, high: int, why: str = "") -> int | None:
    """The whole number ``key`` names in the environment, from ``low`` to ``high``; None when unset."""
    text = env.get(key, "").strip()
    if not text:
        return None
    bounds = f"from {low} to {high}" + (f" ({why})" if why else "")
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{key} must be a whole number {bounds}, not {env[key]!r}")
    return int(text)
