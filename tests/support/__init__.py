"""Test support: real servers (redis-server, upstreams) started on free loopback ports."""
