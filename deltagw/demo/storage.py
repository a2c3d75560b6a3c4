"""The demo storage service: spot history and option chains.

It serves the deterministic :mod:`deltagw.demo.market` read-only, so it needs
no database and every answer is reproducible.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from klein import Klein
from twisted.web.iweb import IRequest

from deltagw.demo._http import (
    ApiError,
    find_chain,
    find_product,
    install_json_errors,
    json_body,
    query_arg,
)
from deltagw.demo.market import ExpiryChain, Market, OptionQuote

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_DIGITS = re.compile(r"[0-9]+")


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    # A strict pattern rather than int(): int() also accepts " 5", "+5"
    # and "1_000", which are not what the contract calls an integer.
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


def _parse_timestamp(name: str, text: str | None) -> float | None:
    """Parse an ISO-8601 bound into epoch seconds; naive times are UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an ISO-8601 timestamp") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _option(quote: OptionQuote) -> dict[str, object]:
    return {
        "strike": quote.strike,
        "last_price": quote.last_price,
        "bid": quote.bid,
        "ask": quote.ask,
        "volume": quote.volume,
        "open_interest": quote.open_interest,
        "iv": round(quote.iv, 6),
    }


class StorageBackend:
    """Klein app answering the storage routes from an in-memory market.

    Args:
        market: The market to serve; shared read-only with analytics.
    """

    app = Klein()
    install_json_errors(app)

    def __init__(self, market: Market) -> None:
        self._market = market

    @app.route("/products", methods=["GET"])
    def products(self, request: IRequest) -> bytes:
        """List the products with data, in listing order."""
        return json_body(
            request, 200, {"products": list(self._market.products)}, cache_control=b"max-age=60"
        )

    @app.route("/underlying/<product>", methods=["GET"])
    def underlying(self, request: IRequest, product: str) -> bytes:
        """Spot ticks, newest first, optionally between ``start`` and ``end``.

        Both bounds are inclusive; ``limit`` (default 100, at most 1000) caps
        the count after filtering, so it always returns the newest ticks of
        the range. A ``start`` after ``end`` is an empty range (no ticks),
        not an error: each bound is valid on its own, and the published
        document cannot state a rule that ties two parameters together.
        """
        found = find_product(self._market, product)
        limit = _parse_limit(query_arg(request, "limit"))
        start = _parse_timestamp("start", query_arg(request, "start"))
        end = _parse_timestamp("end", query_arg(request, "end"))
        ticks = [
            {
                "product": tick.product,
                "price": tick.price,
                "timestamp": tick.iso_timestamp,
            }
            for tick in reversed(found.ticks)
            if (start is None or tick.timestamp >= start)
            and (end is None or tick.timestamp <= end)
        ][:limit]
        return json_body(
            request, 200, {"product": product, "count": len(ticks), "ticks": ticks},
            cache_control=b"max-age=1",
        )

    @app.route("/option/chain/<product>", methods=["GET"])
    def option_chain(self, request: IRequest, product: str) -> bytes:
        """The option chain of one expiry (``expiry``, default the nearest).

        An ``expiry`` that is not a date is a 400; a date on which nothing
        expires is a 404.
        """
        found = find_product(self._market, product)
        expiry = query_arg(request, "expiry")
        chain: ExpiryChain = (
            found.chains[0] if expiry is None else find_chain(found, expiry)
        )
        return json_body(
            request,
            200,
            {
                "product": product,
                "spot": found.spot,
                "expiries": [each.expiry.isoformat() for each in found.chains],
                "expiry": chain.expiry.isoformat(),
                "calls": [_option(quote) for quote in chain.calls],
                "puts": [_option(quote) for quote in chain.puts],
            },
            cache_control=b"max-age=1",
        )
