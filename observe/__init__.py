"""What the operations team watches sandboxctl by: Prometheus metrics (metrics.py) and
OpenTelemetry traces (tracing.py)."""
