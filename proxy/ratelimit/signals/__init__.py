"""What upstreams say about their limits: response headers parsed into observations (``core``),
with the vendor header styles in ``vendors``."""
