"""Placeholder: filled in by its owner."""

from aiohttp import web


def setup(app: web.Application) -> None:
    return None
