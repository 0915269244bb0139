"""The stages of one proxied call, in the order a call meets them.

``plan`` (what a decrypted connection means for every call: base URL, host binding, limits,
timeouts), ``urls`` (the upstream URL, never escaping the base path), ``headers`` (hop-by-hop and
framing hygiene, both directions), ``inject`` (exactly one credential), ``upstream`` (the pooled
client and the resolver that re-checks egress on every resolved address), ``bodykind`` (what an
envelope body is), and ``pipeline`` (the ``Pipeline`` that runs them for every front end).

Kept empty on purpose: importing a pure stage (``urls``, ``headers``, ``inject``) must not load
aiohttp through this package.
"""
