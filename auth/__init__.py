"""Users, roles and NATS permissions: who may do what, enforced where it can be.

Two layers, so that neither has to trust the other's clients:

- **nats-server** authenticates every connection (user and password) and
  enforces subject permissions generated here: a client cannot publish facts,
  append to the log, call a stream-modifying ``$JS.API`` subject or read a
  stream its role does not allow. Each user may publish commands only on
  subjects ending in its own name (``sandboxctl.cmd.<verb>.<user>``), so that
  token *is* the authenticated actor, and no one can speak for someone else.
- **the state machine** reads the roles from ``users.json`` and refuses a
  command whose user lacks the role with ``permission_denied``; the refusal is
  recorded in the audit stream, never in the log.

Everything lives in one directory (``AuthStore``): ``users.json`` (names,
passwords, roles), ``server.conf`` (generated users and permissions, included
by nats-server) and ``credentials/<user>.json``, one per user, mode 0600.
See docs/security.md.
"""

from typing import TYPE_CHECKING

from sandboxctl import lazy_exports

if TYPE_CHECKING:
    from sandboxctl.auth.authorizer import Authorizer, check, record_denied
    from sandboxctl.auth.permissions import component_permissions, server_conf, user_permissions
    from sandboxctl.auth.roles import (
        ADMIN,
        COMPONENT_PREFIX,
        COMPONENT_ROLES,
        DRIVERS,
        READ,
        ROLES,
        WRITE,
        Credentials,
        User,
        adopts_unplaced,
        component_user,
        has_role,
        host_worker_user,
        is_host_worker,
        local_user_name,
        valid_user_name,
    )
    from sandboxctl.auth.store import AuthStore, load_credentials

__all__ = [
    "ADMIN",
    "COMPONENT_PREFIX",
    "COMPONENT_ROLES",
    "DRIVERS",
    "READ",
    "ROLES",
    "WRITE",
    "AuthStore",
    "Authorizer",
    "Credentials",
    "User",
    "adopts_unplaced",
    "check",
    "component_permissions",
    "component_user",
    "has_role",
    "host_worker_user",
    "is_host_worker",
    "load_credentials",
    "local_user_name",
    "record_denied",
    "server_conf",
    "user_permissions",
    "valid_user_name",
]

__getattr__, __dir__ = lazy_exports(__name__)
