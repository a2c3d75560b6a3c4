"""The pure core of an RFC 9111 shared cache for forwarded GET and HEAD routes.

Plain data in, decisions out: no request objects, no I/O, and time only from
an injected clock's ``seconds()``. Header fields are lists of ``(name,
value)`` byte pairs, as `deltagw.upstream.forwarding` builds them.

- `directives`: Cache-Control and Vary, parsed.
- `freshness`: how long a response stays fresh, how old it is, and whether
  a stored one may answer a request (fresh, stale, or not at all).
- `storability`: whether a shared cache may store a response at all.
- `keys`: the primary key (the upstream URL) and the secondary key (the
  request fields the response's Vary names).
- `store`: responses in memory, bounded in bytes, least recently used out.
- `coalescing`: concurrent misses on one key share one upstream call.
- `status`: the ``Cache-Status`` and ``Age`` values of an answer.
- `fields`: reading header fields from ``(name, value)`` pairs.

Putting it in front of the request path is a separate step; this package
imports only the foundations (``tests/unit/test_layers.py``).
"""
