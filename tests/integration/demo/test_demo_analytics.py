"""The demo analytics service: put/call ratios and the volatility surface."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pytest
import pytest_twisted

from deltagw.demo.analytics import volatility_row
from deltagw.demo.market import black_scholes_price, build_market, smile_volatility
from deltagw.demo.platform import DemoPlatform

if TYPE_CHECKING:
    from conftest import Client


@pytest_twisted.ensureDeferred
async def test_pcr_over_all_expiries_totals_every_chain(
    client: Client, platform: DemoPlatform
) -> None:
    """Without ``expiry`` the ratios come from totals over every expiry."""
    chains = build_market().products["NIFTY"].chains
    call_oi = sum(q.open_interest for c in chains for q in c.calls)
    put_oi = sum(q.open_interest for c in chains for q in c.puts)
    call_volume = sum(q.volume for c in chains for q in c.calls)
    put_volume = sum(q.volume for c in chains for q in c.puts)

    reply = await client.get(f"{platform.urls['analytics']}/pcr/NIFTY")

    assert reply.status == 200
    assert reply.json == {
        "product": "NIFTY",
        "expiry": None,
        "pcr_oi": round(put_oi / call_oi, 4),
        "pcr_volume": round(put_volume / call_volume, 4),
        "total_call_oi": call_oi,
        "total_put_oi": put_oi,
        "total_call_volume": call_volume,
        "total_put_volume": put_volume,
    }


@pytest_twisted.ensureDeferred
async def test_pcr_for_one_expiry_uses_only_its_chain(
    client: Client, platform: DemoPlatform
) -> None:
    """With ``expiry`` the totals cover that expiry's chain alone."""
    chain = build_market().products["BANKNIFTY"].chains[1]
    expiry = chain.expiry.isoformat()

    reply = await client.get(
        f"{platform.urls['analytics']}/pcr/BANKNIFTY", {"expiry": expiry}
    )

    body = reply.json
    assert reply.status == 200
    assert body["expiry"] == expiry
    assert body["total_call_oi"] == sum(q.open_interest for q in chain.calls)
    assert body["total_put_volume"] == sum(q.volume for q in chain.puts)
    assert body["pcr_oi"] == round(body["total_put_oi"] / body["total_call_oi"], 4)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/pcr/DOWJONES", 404, id="pcr-unknown-product"),
        pytest.param("/pcr/NIFTY?expiry=2025-01-17", 404, id="pcr-unknown-expiry"),
        pytest.param("/pcr/NIFTY?expiry=soon", 400, id="pcr-malformed-expiry"),
        pytest.param("/volatility-surface/DOWJONES", 404, id="surface-unknown-product"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_analytics_rejects_unknown_products_and_expiries(
    client: Client, platform: DemoPlatform, path: str, status: int
) -> None:
    """Unknown products and expiries get 404, malformed expiries 400, as JSON."""
    reply = await client.get(platform.urls["analytics"] + path)

    assert reply.status == status
    assert reply.content_type == "application/json"
    assert "error" in reply.json


@pytest.mark.parametrize("product", ["NIFTY", "BANKNIFTY", "FINNIFTY"])
@pytest_twisted.ensureDeferred
async def test_volatility_surface_recovers_the_generating_smile(
    client: Client, platform: DemoPlatform, product: str
) -> None:
    """Volatilities solved from the chain's prices match the smile within 1e-4."""
    market = build_market().products[product]

    reply = await client.get(
        f"{platform.urls['analytics']}/volatility-surface/{product}"
    )

    body = reply.json
    assert reply.status == 200
    assert body["expiries"] == [c.expiry.isoformat() for c in market.chains]
    assert body["strikes"] == list(market.strikes)
    assert len(body["surface"]) == len(market.chains)
    for chain, row in zip(market.chains, body["surface"], strict=True):
        assert len(row) == len(market.strikes)
        for strike, solved in zip(market.strikes, row, strict=True):
            expected = smile_volatility(
                market.spec, chain.forward, strike, chain.time_to_expiry
            )
            assert solved == pytest.approx(expected, abs=1e-4)


def test_surface_is_solved_from_prices_not_read_from_quotes() -> None:
    """The surface follows the option prices even when the quoted iv says otherwise."""
    market = build_market()
    product = market.products["NIFTY"]
    chain = product.chains[2]

    def repriced(quote, kind):  # type: ignore[no-untyped-def]
        price = black_scholes_price(
            kind, product.spot, quote.strike, chain.time_to_expiry, market.rate, 0.25
        )
        return dataclasses.replace(quote, last_price=price, iv=0.99)

    flat = dataclasses.replace(
        chain,
        calls=tuple(repriced(q, "call") for q in chain.calls),
        puts=tuple(repriced(q, "put") for q in chain.puts),
    )

    row = volatility_row(flat, product.spot, market.rate)

    assert row == pytest.approx([0.25] * len(row), abs=1e-6)
