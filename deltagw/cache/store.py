"""Stored responses in memory, bounded in bytes, least recently used out first.

Entries are kept by primary key (the upstream URL, `deltagw.cache.keys`);
each holds the variants of that URL by secondary key (the values of the
request fields its Vary names). One Vary per URL: when the upstream answers
with a different Vary than the stored variants were chosen by, they are
dropped and the new response starts afresh, so a lookup is two dict
accesses. (Varnish keeps each variant's own Vary and checks them one by one;
RFC 9111 §4.1 lets a cache prefer the most recent response, which this is.)

The bound is on bytes, not on entries: a response's accounted size is its
content, its header fields, its secondary key, and a fixed charge per
Python object that holds them (`RESPONSE_OVERHEAD_BYTES`,
`FIELD_OVERHEAD_BYTES`, `KEY_VALUE_OVERHEAD_BYTES`, `ENTRY_OVERHEAD_BYTES`),
measured with tracemalloc on CPython 3.11 so that ``max_bytes`` bounds the
memory the store really holds, not only its payload, give or take the
hash table's slack (`TABLE_SLACK_BYTES_PER_ENTRY`;
``tests/unit/test_cache_store.py`` checks it with 100,000 keys). Using an
entry moves it to the recent end of an ``OrderedDict``; making room pops
the other end: both O(1).

The store does not look at time: whether a stored response may answer is
`deltagw.cache.freshness.use_of_stored`'s decision, and a response too old
for any use simply ages out of the LRU order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from deltagw.cache.directives import parse_vary
from deltagw.cache.fields import HeaderPairs
from deltagw.cache.freshness import Freshness
from deltagw.cache.keys import SecondaryKey, secondary_key

RESPONSE_OVERHEAD_BYTES = 480
"""Charged per stored response: the `StoredResponse`, its freshness and directives, its
numbers, its tuples and the bytes objects of its content and reason."""

FIELD_OVERHEAD_BYTES = 140
"""Charged per header field beyond its name and value: a pair tuple and two bytes objects."""

KEY_VALUE_OVERHEAD_BYTES = 128
"""Charged per secondary key value beyond its length: its bytes object, its tuple slot,
and the Vary field name it answers."""

ENTRY_OVERHEAD_BYTES = 500
"""Charged per URL beyond its length: the URL's bytes, the entry, its variants dict and
its place in the LRU order."""

TABLE_SLACK_BYTES_PER_ENTRY = 128
"""Not charged: what the LRU's hash table may hold beyond its charge right after it grows.

The memory really held stays under ``max_bytes`` plus this much per URL
held (``tests/unit/test_cache_store.py`` measures it with tracemalloc).
Charging it would make the store hold fewer entries most of the time for a
peak that lasts until the next resize.
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored, everything needed to answer with it later.

    Attributes:
        status: The upstream's status.
        reason: Its reason phrase, as received.
        headers: Its header fields, in order; the caller replaces Age with
            the current age when answering (RFC 9111 §4.2.3, see
            `deltagw.cache.status.age_header_value`).
        body: Its complete content.
        request_time: ``reactor.seconds()`` when the request was sent upstream.
        response_time: ``reactor.seconds()`` when the response arrived.
        freshness: Its lifetime and initial age (`deltagw.cache.freshness.freshness_of`).
    """

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    request_time: float
    response_time: float
    freshness: Freshness


def accounted_size(response: StoredResponse, key: SecondaryKey) -> int:
    """The bytes a stored response counts for against the store's bounds.

    Args:
        response: The response.
        key: The secondary key it is stored under.

    Returns:
        Content, reason, field names and values and key values, plus the
        fixed charges per object that hold them.
    """
    size = RESPONSE_OVERHEAD_BYTES + len(response.body) + len(response.reason)
    for name, value in response.headers:
        size += FIELD_OVERHEAD_BYTES + len(name) + len(value)
    for value in key:
        size += KEY_VALUE_OVERHEAD_BYTES + (0 if value is None else len(value))
    return size


class _Entry:
    """The variants of one URL and the Vary that chose them."""

    __slots__ = ("vary_names", "variants", "size")

    def __init__(self, vary_names: tuple[bytes, ...], size: int) -> None:
        self.vary_names = vary_names
        self.variants: dict[SecondaryKey, StoredResponse] = {}
        self.size = size


class ResponseStore:
    """Stored responses by URL and Vary-named request fields, within a byte budget.

    Attributes:
        evictions: Entries (URLs, with all their variants) removed to make
            room since the store was made; purges do not count.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        """Create an empty store.

        Args:
            max_bytes: The most bytes (`accounted_size`, plus the charge per
                URL) held at once; the least recently used entries go first.
            max_entry_bytes: The most bytes one response may count for; a
                larger one is not stored at all, so one big answer never
                flushes the many small ones.

        Raises:
            ValueError: A bound that is not positive, or a response bound
                above the total (a store that could not hold one response
                it accepts would hide a configuration error).
        """
        if max_bytes <= 0 or max_entry_bytes <= 0:
            raise ValueError(
                f"bounds must be positive, got {max_bytes!r} and {max_entry_bytes!r}"
            )
        if max_entry_bytes > max_bytes:
            raise ValueError(
                f"max_entry_bytes {max_entry_bytes!r} is over max_bytes {max_bytes!r}"
            )
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.evictions = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._variants = 0

    @property
    def entries(self) -> int:
        """URLs held."""
        return len(self._entries)

    @property
    def variants(self) -> int:
        """Responses held, over all URLs."""
        return self._variants

    @property
    def stored_bytes(self) -> int:
        """Bytes held, as accounted; never above ``max_bytes``."""
        return self._bytes

    def __contains__(self, url: bytes) -> bool:
        """Whether any response is held for ``url``: a URL miss or a Vary miss (RFC 9211)."""
        return url in self._entries

    def lookup(self, url: bytes, request_headers: HeaderPairs) -> StoredResponse | None:
        """The stored response that matches a request, if any (RFC 9111 §4, §4.1).

        A response found becomes the most recently used. Whether it may
        answer (fresh, stale) is for `deltagw.cache.freshness.use_of_stored`.

        Args:
            url: The request's primary key (`deltagw.cache.keys.primary_key`).
            request_headers: The request's header fields as the upstream
                sees them (`deltagw.cache.keys`).

        Returns:
            The response whose Vary-named fields match, or None.
        """
        entry = self._entries.get(url)
        if entry is None:
            return None
        response = entry.variants.get(secondary_key(entry.vary_names, request_headers))
        if response is not None:
            self._entries.move_to_end(url)
        return response

    def store(self, url: bytes, request_headers: HeaderPairs, response: StoredResponse) -> bool:
        """Store a response, replacing the one that matched the same request.

        The caller has already decided that it may be stored
        (`deltagw.cache.storability.storage_refusal`).

        Args:
            url: The request's primary key.
            request_headers: The request's header fields as the upstream saw
                them; with the response's Vary they give the secondary key.
            response: The response.

        Returns:
            Whether it is now stored: False when it is over
            ``max_entry_bytes``, when its Vary cannot be matched (``*``),
            or when its URL's variants together do not fit in ``max_bytes``.
        """
        vary = parse_vary(response.headers)
        if vary.varies_on_anything:
            return False
        key = secondary_key(vary.field_names, request_headers)
        size = accounted_size(response, key)
        if size > self.max_entry_bytes:
            return False
        entry = self._entries.get(url)
        if entry is None:
            entry = _Entry(vary.field_names, ENTRY_OVERHEAD_BYTES + len(url))
            self._entries[url] = entry
            self._bytes += entry.size
        else:
            self._entries.move_to_end(url)
            if entry.vary_names != vary.field_names:
                self._drop_variants(entry)
                entry.vary_names = vary.field_names
            else:
                self._drop_variant(entry, key)
        entry.variants[key] = response
        entry.size += size
        self._bytes += size
        self._variants += 1
        self._make_room()
        return url in self._entries

    def purge(self, url: bytes) -> int:
        """Remove every response held for a URL (all its variants).

        Returns:
            How many responses were removed.
        """
        entry = self._entries.pop(url, None)
        if entry is None:
            return 0
        return self._forget(entry)

    def purge_prefix(self, prefix: bytes) -> int:
        """Remove every response held for a URL that starts with ``prefix``.

        A walk over every URL held: an operator's occasional request, not
        a lookup, so no index by prefix is kept for it.

        Returns:
            How many responses were removed.
        """
        urls = [url for url in self._entries if url.startswith(prefix)]
        return sum(self.purge(url) for url in urls)

    def purge_all(self) -> int:
        """Remove every response held.

        Returns:
            How many responses were removed.
        """
        removed = self._variants
        self._entries.clear()
        self._bytes = 0
        self._variants = 0
        return removed

    def _make_room(self) -> None:
        while self._bytes > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._forget(entry)
            self.evictions += 1

    def _forget(self, entry: _Entry) -> int:
        """Take a removed entry's bytes and variants off the counts."""
        self._bytes -= entry.size
        removed = len(entry.variants)
        self._variants -= removed
        return removed

    def _drop_variant(self, entry: _Entry, key: SecondaryKey) -> None:
        old = entry.variants.pop(key, None)
        if old is not None:
            size = accounted_size(old, key)
            entry.size -= size
            self._bytes -= size
            self._variants -= 1

    def _drop_variants(self, entry: _Entry) -> None:
        for key in list(entry.variants):
            self._drop_variant(entry, key)
