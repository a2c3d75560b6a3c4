"""The demo analytics service: put/call ratios and the volatility surface.

It reads the same in-process :class:`~deltagw.demo.market.Market` as the
storage service instead of calling it over HTTP: the demo is one process, and
the market is immutable.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest

from deltagw.demo._http import find_chain, find_product, install_json_errors, json_body, query_arg
from deltagw.demo.market import ExpiryChain, Market, implied_volatility


def volatility_row(chain: ExpiryChain, spot: float, rate: float) -> list[float | None]:
    """Implied volatilities of one expiry, by ascending strike.

    Each strike uses its out-of-the-money option (puts below the forward,
    calls at or above it): that is the liquid side in practice, and its price
    is all time value, so nothing is lost to intrinsic value.

    Args:
        chain: The expiry's options.
        spot: Spot the chain was priced against.
        rate: Risk-free rate.

    Returns:
        One volatility per strike, None where the price admits none.
    """
    row: list[float | None] = []
    for call, put in zip(chain.calls, chain.puts, strict=True):
        if call.strike >= chain.forward:
            iv = implied_volatility(
                call.last_price, "call", spot, call.strike, chain.time_to_expiry, rate
            )
        else:
            iv = implied_volatility(
                put.last_price, "put", spot, put.strike, chain.time_to_expiry, rate
            )
        row.append(None if iv is None else round(iv, 6))
    return row


class AnalyticsBackend:
    """Klein app computing analytics over the demo market.

    Args:
        market: The market to analyse; shared read-only with storage.
    """

    app = Klein()
    install_json_errors(app)

    def __init__(self, market: Market) -> None:
        self._market = market

    @app.route("/pcr/<product>", methods=["GET"])
    def pcr(self, request: IRequest, product: str) -> bytes:
        """Put/call ratios by open interest and volume, with their totals.

        Without ``expiry`` the totals run over every listed expiry. The
        generated market gives every option at least one lot of open
        interest and volume, so the ratios are always defined.
        """
        found = find_product(self._market, product)
        expiry = query_arg(request, "expiry")
        chains = found.chains if expiry is None else (find_chain(found, expiry),)
        call_oi = sum(q.open_interest for chain in chains for q in chain.calls)
        put_oi = sum(q.open_interest for chain in chains for q in chain.puts)
        call_volume = sum(q.volume for chain in chains for q in chain.calls)
        put_volume = sum(q.volume for chain in chains for q in chain.puts)
        return json_body(
            request,
            200,
            {
                "product": product,
                "expiry": None if expiry is None else chains[0].expiry.isoformat(),
                "pcr_oi": round(put_oi / call_oi, 4),
                "pcr_volume": round(put_volume / call_volume, 4),
                "total_call_oi": call_oi,
                "total_put_oi": put_oi,
                "total_call_volume": call_volume,
                "total_put_volume": put_volume,
            },
            cache_control=b"max-age=1",
        )

    @app.route("/volatility-surface/<product>", methods=["GET"])
    def volatility_surface(self, request: IRequest, product: str) -> bytes:
        """Implied volatilities recovered from option prices.

        ``surface[i][j]`` is the volatility for ``expiries[i]`` and
        ``strikes[j]``, solved from the chain's prices by inverting
        Black–Scholes (not read from the generator).
        """
        found = find_product(self._market, product)
        return json_body(
            request,
            200,
            {
                "product": product,
                "expiries": [chain.expiry.isoformat() for chain in found.chains],
                "strikes": list(found.strikes),
                "surface": [
                    volatility_row(chain, found.spot, self._market.rate)
                    for chain in found.chains
                ],
            },
            cache_control=b"max-age=5",
        )
