"""Rate limiting: configured windows, learned upstream limits, shared state."""
