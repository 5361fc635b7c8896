"""What operators see of the running bridge: Prometheus metrics, the health endpoints, structured logs."""
