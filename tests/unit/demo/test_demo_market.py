"""The deterministic market and the Black–Scholes pricing and inversion."""

from __future__ import annotations

import math

import pytest

from deltagw.demo.market import (
    SESSION_START,
    OptionKind,
    black_scholes_price,
    black_scholes_vega,
    build_market,
    implied_volatility,
)


def test_two_builds_are_identical() -> None:
    """Building the market twice gives the same ticks and chains."""
    first, second = build_market(), build_market()

    assert first == second
    assert first.products["NIFTY"].ticks == second.products["NIFTY"].ticks


def test_ticks_start_at_a_fixed_time() -> None:
    """The first tick is at the fixed session start, whatever the wall clock says."""
    market = build_market()

    for product in market.products.values():
        assert product.ticks[0].timestamp == SESSION_START.timestamp()
        assert product.ticks[0].iso_timestamp == "2025-01-06T03:45:00Z"
        assert product.ticks[-1].iso_timestamp == "2025-01-10T09:59:00Z"


def test_the_seed_decides_the_walk() -> None:
    """A different seed gives a different spot history."""
    prices = [t.price for t in build_market(seed=1).products["NIFTY"].ticks]
    others = [t.price for t in build_market(seed=2).products["NIFTY"].ticks]

    assert prices != others


def test_chains_list_strikes_around_spot() -> None:
    """Every chain lists the same strikes around spot, with sane quotes."""
    for product in build_market().products.values():
        assert product.strikes[0] < product.spot < product.strikes[-1]
        assert list(product.strikes) == sorted(product.strikes)
        assert len(product.chains) >= 4
        for chain in product.chains:
            assert [q.strike for q in chain.calls] == list(product.strikes)
            assert [q.strike for q in chain.puts] == list(product.strikes)
            for quote in chain.calls + chain.puts:
                assert 0 < quote.bid <= quote.last_price <= quote.ask
                assert quote.volume > 0 and quote.open_interest > 0


def test_black_scholes_satisfies_put_call_parity() -> None:
    """A call minus a put equals spot minus the discounted strike."""
    spot, t, rate, sigma = 22000.0, 0.1, 0.065, 0.2
    for strike in (18000.0, 22000.0, 26000.0):
        call = black_scholes_price("call", spot, strike, t, rate, sigma)
        put = black_scholes_price("put", spot, strike, t, rate, sigma)

        assert call - put == pytest.approx(
            spot - strike * math.exp(-rate * t), abs=1e-8
        )


@pytest.mark.parametrize("kind", ["call", "put"])
@pytest.mark.parametrize("t", [2 / 365, 0.25, 2.0])
@pytest.mark.parametrize("sigma", [0.03, 0.15, 0.6, 2.5])
def test_implied_volatility_inverts_black_scholes(
    kind: OptionKind, t: float, sigma: float
) -> None:
    """The solver recovers the volatility a price was made with, across moneyness."""
    spot, rate = 100.0, 0.065
    for strike in (60.0, 90.0, 100.0, 110.0, 150.0):
        price = black_scholes_price(kind, spot, strike, t, rate, sigma)
        # Where vega is negligible the price no longer pins the volatility
        # down in double precision; only well-posed cases are checked. About
        # a fifth of the rest need bisection: Newton's first step from 0.3
        # leaves the bracket.
        if black_scholes_vega(spot, strike, t, rate, sigma) < 1e-3:
            continue

        solved = implied_volatility(price, kind, spot, strike, t, rate)

        assert solved == pytest.approx(sigma, abs=1e-8), (strike, price)


@pytest.mark.parametrize(
    ("price", "kind", "strike"),
    [
        pytest.param(101.0, "call", 100.0, id="call-above-spot"),
        pytest.param(0.5, "call", 90.0, id="call-below-intrinsic"),
        pytest.param(100.0, "put", 100.0, id="put-above-discounted-strike"),
        pytest.param(0.0, "put", 90.0, id="worthless"),
    ],
)
def test_implied_volatility_is_none_outside_arbitrage_bounds(
    price: float, kind: OptionKind, strike: float
) -> None:
    """A price no volatility can produce has no implied volatility."""
    assert implied_volatility(price, kind, 100.0, strike, 0.5, 0.065) is None


def test_implied_volatility_is_none_beyond_the_search_range() -> None:
    """A price that needs a volatility above the upper bound gives None."""
    price = black_scholes_price("call", 100.0, 100.0, 0.5, 0.0, 4.0)

    assert implied_volatility(price, "call", 100.0, 100.0, 0.5, 0.0, high=3.0) is None
