"""The operator surface through a real gateway: docs, Swagger UI, metrics."""

from __future__ import annotations

import json

import pytest_twisted
from openapi_spec_validator import validate

from deltagw import __version__
from deltagw.routes import ROUTES
from deltagw.web.application import Gateway


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@pytest_twisted.ensureDeferred
async def test_docs_never_reflect_an_invented_host(gateway):
    """/api/docs and /api/v1/docs serve a valid document, each route once; a Host that is not
    the listening address is not reflected (servers is "/"), the listening address is."""
    for path in ("/api/docs", "/api/v1/docs"):
        response = await gateway.get(path, headers={b"Host": [b"evil.example"]})
        document = json.loads(await response.content())
        validate(document)
        assert document["servers"] == [{"url": "/"}]
    assert len([op for item in document["paths"].values() for op in item]) == len(ROUTES) == 16
    documented = set(document["paths"])
    served = {rule.rule.replace("<", "{").replace(">", "}") for rule in Gateway.app.url_map.iter_rules()}
    assert documented <= served
    own = f"127.0.0.1:{gateway.port_number}"
    response = await gateway.get("/api/docs", headers={b"Host": [own.encode()]})
    assert json.loads(await response.content())["servers"] == [{"url": f"http://{own}"}]


@pytest_twisted.ensureDeferred
async def test_docs_servers_from_public_url(make_gateway, upstream):
    gateway = await make_gateway(PUBLIC_URL="https://api.example.com")
    response = await gateway.get("/api/docs", headers={b"Host": [b"evil.example"]})
    assert json.loads(await response.content())["servers"] == [{"url": "https://api.example.com"}]


@pytest_twisted.ensureDeferred
async def test_swagger_ui_served_offline(gateway):
    """/api/docs/ui is a page whose scripts come from the gateway itself, pointed at /api/docs."""
    page = await gateway.get("/api/docs/ui")
    html = (await page.content()).decode()
    assert page.code == 200 and "https://" not in html and "http://" not in html
    initializer = await gateway.get("/api/docs/ui/swagger-initializer.js")
    script = (await initializer.content()).decode()
    assert "/api/docs" in script and "validatorUrl: null" in script
    bundle = await gateway.get("/api/docs/ui/swagger-ui-bundle.js")
    assert bundle.code == 200 and len(await bundle.content()) > 100_000


@pytest_twisted.ensureDeferred
async def test_random_paths_do_not_grow_series(gateway, upstream):
    """1,000 distinct unknown paths add one 'unmatched' series, not a thousand."""
    await (await gateway.get("/api/data/products")).content()
    for i in range(1000):
        await (await gateway.get(f"/scan/{i}/x{i}")).content()
    metrics = await gateway.get("/metrics")
    text = (await metrics.content()).decode()
    series = _series(text, "deltagw_http_requests_total")
    assert any('route="/api/data/products"' in line for line in series)
    unmatched = [line for line in series if 'route="unmatched"' in line]
    assert len(unmatched) == 1 and unmatched[0].endswith(" 1000.0")
    assert all("/scan/" not in line for line in text.splitlines())
    assert _series(text, "deltagw_upstream_request_duration_seconds_count")
    assert _series(text, "deltagw_circuit_state")


@pytest_twisted.ensureDeferred
async def test_metrics_say_which_deltagw_and_how_the_process_fares(gateway):
    """deltagw_build_info carries the version; the standard process_* series are there."""
    text = (await (await gateway.get("/metrics")).content()).decode()
    assert f'deltagw_build_info{{version="{__version__}"}} 1.0' in text.splitlines()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                 "process_open_fds", "process_max_fds", "python_info"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    health = json.loads(await (await gateway.get("/health")).content())
    assert health["version"] == __version__


@pytest_twisted.ensureDeferred
async def test_metrics_restricted_by_allow_list(make_gateway):
    """With METRICS_ALLOW, a client outside it gets 404 and nothing else changes."""
    gateway = await make_gateway(METRICS_ALLOW="10.0.0.0/8")
    refused = await gateway.get("/metrics")
    await refused.content()
    assert refused.code == 404
    allowed = await make_gateway(METRICS_ALLOW="127.0.0.0/8")
    response = await allowed.get("/metrics")
    assert response.code == 200 and b"deltagw_http_requests_total" in await response.content()


def test_readme_route_table_lists_every_route():
    """README's route table names every row of the route table, by method and path."""
    from pathlib import Path

    from deltagw.routes import ROUTES

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = [line for line in readme.split("## Routes", 1)[1].splitlines() if line.startswith("| ")]
    for route in ROUTES:
        assert any(
            line.startswith(f"| {route.method} | ") and route.template in line.split("|")[2]
            for line in table
        ), route.template
