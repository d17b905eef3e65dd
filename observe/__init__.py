"""What the operations team watches sandboxctl by: Prometheus metrics (metrics.py)."""
