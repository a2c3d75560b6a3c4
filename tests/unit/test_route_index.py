"""The fast route index, read from Klein's URL map, agrees with Klein on every row."""

from __future__ import annotations

import pytest
from werkzeug.exceptions import HTTPException

from deltagw.routes import ROUTES
from deltagw.web.application import ROUTE_INDEX, Gateway


def _klein_match(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    adapter = Gateway.app.url_map.bind("gateway", default_method=method)
    try:
        rule, params = adapter.match(path, method=method, return_rule=True)
    except HTTPException:
        return None
    return rule.endpoint.split(" ")[0], params


_CASES = [
    (method, path.replace("{product}", "NIFTY"))
    for route in ROUTES
    if not route.subtree
    for path in route.public_paths
    for method in ([route.method, "HEAD"] if route.method == "GET" else [route.method])
]


@pytest.mark.parametrize(("method", "path"), _CASES)
def test_index_names_the_row_klein_would(method: str, path: str) -> None:
    """Each public path of each row resolves to the same row and parameters as in Klein."""
    found = ROUTE_INDEX.match(method.encode(), path.encode())
    assert found is not None
    route, params = found
    assert (route.name, params) == _klein_match(method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/data/chain/"),  # empty parameter
        ("GET", "/api/data/chain/NIFTY/extra"),  # one segment too many
        ("GET", "/api/data/products/"),  # trailing slash
        ("GET", "/api/data/chain/NIFTY%2050"),  # escapes: Klein decodes
        ("POST", "/api/data/products"),  # wrong method: Klein answers 405
        ("OPTIONS", "/api/data/products"),  # preflight
        ("GET", "/api/docs/ui/index.css"),  # subtree
        ("GET", "/nowhere"),
    ],
)
def test_index_leaves_everything_else_to_klein(method: str, path: str) -> None:
    """Misses, escapes, other methods, preflights and subtrees go to Klein, the reference."""
    assert ROUTE_INDEX.match(method.encode(), path.encode()) is None
