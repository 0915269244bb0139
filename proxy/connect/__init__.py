"""Hosted connect pages without HTTP: connect sessions, the end-user form, and the connect flow
(pre-checks, one-time links, OAuth authorization-code start and finish, writing the connection)."""
