"""connection-proxy: credential-injecting reverse proxy, shared rate limiter and vault."""

__version__ = "0.1.0"
