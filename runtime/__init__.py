"""Running sandboxctl: configuration from the environment, ``up`` (a nats-server and a podman
service of its own) and ``serve``, the supervision of what they run, and health."""
