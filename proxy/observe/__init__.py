"""What the service tells its operators: the audit trail, Prometheus metrics and redacted logs."""
