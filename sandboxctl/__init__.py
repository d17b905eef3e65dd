"""sandboxctl: a lifecycle control plane for sandboxes, under one import name.

The rooms of the repository are its subpackages, lowest first; each imports only
from the ones before it (tests/unit/test_layers.py checks it):

- ``sandboxctl.events``: the wire contract (``events/``);
- ``sandboxctl.statemachine``: the pure core, decide, react, evolve (``statemachine/``);
- ``sandboxctl.bus``: NATS and JetStream plumbing, the log read and written (``bus/``);
- ``sandboxctl.client``: the Python SDK (``client/``);
- ``sandboxctl.auth``: users, roles and permissions (``auth/``);
- ``sandboxctl.drivers``: the container engines (``drivers/``);
- ``sandboxctl.services``: the long-running processes (``services/``);
- ``sandboxctl.audit``: the operators' tools on the log (``audit/``);
- ``sandboxctl.runtime``: configuration, ``up`` and ``serve``, supervision, health (``runtime/``);
- ``sandboxctl.cli``: the command line (``cli/``).
"""

__version__ = "0.1.0"
