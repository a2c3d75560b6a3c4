"""The demo storage service's HTTP contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted

from deltagw.demo.platform import DemoPlatform

if TYPE_CHECKING:
    from conftest import Client, MakePlatform


@pytest_twisted.ensureDeferred
async def test_products_list_the_indices(
    client: Client, platform: DemoPlatform
) -> None:
    """The product list includes NIFTY, BANKNIFTY and FINNIFTY."""
    reply = await client.get(f"{platform.urls['storage']}/products")

    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert {"NIFTY", "BANKNIFTY", "FINNIFTY"} <= set(reply.json["products"])


@pytest_twisted.ensureDeferred
async def test_underlying_returns_the_newest_hundred_ticks_first(
    client: Client, platform: DemoPlatform
) -> None:
    """Without parameters the 100 newest ticks come back, newest first."""
    reply = await client.get(f"{platform.urls['storage']}/underlying/NIFTY")

    body = reply.json
    assert reply.status == 200
    assert body["product"] == "NIFTY"
    assert body["count"] == len(body["ticks"]) == 100
    stamps = [tick["timestamp"] for tick in body["ticks"]]
    assert stamps == sorted(stamps, reverse=True)
    assert stamps[0] == "2025-01-10T09:59:00Z"
    assert set(body["ticks"][0]) == {"product", "price", "timestamp"}


@pytest.mark.parametrize("limit", [1, 1000])
@pytest_twisted.ensureDeferred
async def test_underlying_limit_caps_the_count(
    client: Client, platform: DemoPlatform, limit: int
) -> None:
    """``limit`` from 1 to 1000 sets how many ticks come back."""
    reply = await client.get(
        f"{platform.urls['storage']}/underlying/BANKNIFTY", {"limit": str(limit)}
    )

    assert reply.status == 200
    assert reply.json["count"] == limit


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": "0"}, id="zero"),
        pytest.param({"limit": "-1"}, id="negative"),
        pytest.param({"limit": "1001"}, id="over-1000"),
        pytest.param({"limit": "ten"}, id="word"),
        pytest.param({"limit": "1.5"}, id="fraction"),
        pytest.param({"limit": ""}, id="empty"),
        pytest.param({"limit": ["5", "6"]}, id="repeated"),
        pytest.param({"start": "yesterday"}, id="bad-start"),
        pytest.param({"end": "2025-13-01"}, id="bad-end"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_underlying_rejects_bad_parameters(
    client: Client, platform: DemoPlatform, params: dict[str, Any]
) -> None:
    """Out-of-range or malformed parameters get a JSON 400."""
    reply = await client.get(f"{platform.urls['storage']}/underlying/NIFTY", params)

    assert reply.status == 400
    assert reply.content_type == "application/json"
    assert "error" in reply.json


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param("2025-01-07T04:00:00Z", "2025-01-07T04:09:00Z", id="utc"),
        pytest.param(
            "2025-01-07T09:30:00+05:30", "2025-01-07T09:39:00+05:30", id="ist"
        ),
        pytest.param("2025-01-07T04:00:00", "2025-01-07T04:09:00", id="naive-is-utc"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_underlying_filters_by_an_inclusive_time_range(
    client: Client, platform: DemoPlatform, start: str, end: str
) -> None:
    """``start`` and ``end`` keep the ticks between them, bounds included."""
    reply = await client.get(
        f"{platform.urls['storage']}/underlying/NIFTY", {"start": start, "end": end}
    )

    stamps = [tick["timestamp"] for tick in reply.json["ticks"]]
    assert reply.status == 200
    assert stamps[0] == "2025-01-07T04:09:00Z"
    assert stamps[-1] == "2025-01-07T04:00:00Z"
    assert len(stamps) == 10


@pytest_twisted.ensureDeferred
async def test_underlying_start_after_end_is_an_empty_range(
    client: Client, platform: DemoPlatform
) -> None:
    """An inverted range holds no ticks: 200 with none, not a 400 (both bounds are valid)."""
    reply = await client.get(
        f"{platform.urls['storage']}/underlying/NIFTY",
        {"start": "2025-01-08T00:00:00Z", "end": "2025-01-07T00:00:00Z"},
    )

    assert reply.status == 200
    assert reply.json["count"] == 0
    assert reply.json["ticks"] == []


@pytest.mark.parametrize(
    "path",
    ["/underlying/DOWJONES", "/option/chain/DOWJONES", "/underlying/nifty"],
)
@pytest_twisted.ensureDeferred
async def test_unknown_products_are_404(
    client: Client, platform: DemoPlatform, path: str
) -> None:
    """A product the market does not list gets a JSON 404."""
    reply = await client.get(f"{platform.urls['storage']}{path}")

    assert reply.status == 404
    assert reply.json["error"].startswith("Unknown product")


@pytest_twisted.ensureDeferred
async def test_chain_defaults_to_the_nearest_expiry(
    client: Client, platform: DemoPlatform
) -> None:
    """Without ``expiry`` the chain of the nearest expiry comes back, fully quoted."""
    reply = await client.get(f"{platform.urls['storage']}/option/chain/NIFTY")

    body = reply.json
    assert reply.status == 200
    assert body["product"] == "NIFTY"
    assert body["expiries"] == sorted(body["expiries"])
    assert len(body["expiries"]) >= 4
    assert body["expiry"] == body["expiries"][0]
    strikes = [option["strike"] for option in body["calls"]]
    assert strikes == [option["strike"] for option in body["puts"]]
    assert strikes[0] < body["spot"] < strikes[-1]
    for option in body["calls"] + body["puts"]:
        assert set(option) == {
            "strike",
            "last_price",
            "bid",
            "ask",
            "volume",
            "open_interest",
            "iv",
        }
        assert option["bid"] <= option["last_price"] <= option["ask"]


@pytest_twisted.ensureDeferred
async def test_chain_selects_the_requested_expiry(
    client: Client, platform: DemoPlatform
) -> None:
    """``expiry`` picks one of the listed expiries."""
    url = f"{platform.urls['storage']}/option/chain/FINNIFTY"
    last = (await client.get(url)).json["expiries"][-1]

    reply = await client.get(url, {"expiry": last})

    assert reply.status == 200
    assert reply.json["expiry"] == last


@pytest.mark.parametrize(
    ("expiry", "status"),
    [
        pytest.param("2025-01-17", 404, id="not-listed"),
        pytest.param("next-thursday", 400, id="not-a-date"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_chain_rejects_unknown_expiries(
    client: Client, platform: DemoPlatform, expiry: str, status: int
) -> None:
    """A date that is not listed gets 404; a value that is not a date gets 400."""
    reply = await client.get(
        f"{platform.urls['storage']}/option/chain/NIFTY", {"expiry": expiry}
    )

    assert reply.status == status
    assert reply.content_type == "application/json"
    assert "error" in reply.json


@pytest_twisted.ensureDeferred
async def test_answers_are_the_same_on_every_run(
    client: Client, start_platform: MakePlatform, tmp_path: Any
) -> None:
    """Two independent platforms answer the same request with the same bytes."""
    first = start_platform()
    second = start_platform(state_dir=str(tmp_path / "other"))

    for path in ("/underlying/NIFTY?limit=1000", "/option/chain/BANKNIFTY"):
        one = await client.get(first.urls["storage"] + path)
        two = await client.get(second.urls["storage"] + path)

        assert one.status == 200
        assert one.body == two.body
