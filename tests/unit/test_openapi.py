"""The OpenAPI document is valid, complete and follows the route table; the
Swagger UI resource serves only its bundled files."""

from __future__ import annotations

import json
import re
from typing import Any

import swagger_ui_bundle
from klein import Klein
from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from deltagw.policy.route_access import REQUIRED, auth_policy
from deltagw.routes import ROUTES, ROUTES_BY_NAME, Route
from deltagw.web.application import Gateway
from deltagw.web.openapi import BEARER, OPENAPI_VERSION, openapi_document
from deltagw.web.swagger_ui import BUNDLED_ASSETS, INITIALIZER, SwaggerUIResource

SERVER = "https://gateway.example.com:8443"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Rows the lead adds to the table; the document must handle them without
# any change here (they are documented from the table alone).
META_ROWS = (
    Route("docs", "meta", "GET", "/api/docs", None, None, "This document.", versioned=False),
    Route("docs_ui", "meta", "GET", "/api/docs/ui", None, None, "Swagger UI.", versioned=False),
    Route("metrics", "meta", "GET", "/metrics", None, None, "Prometheus metrics.", versioned=False),
    Route("health_ready", "meta", "GET", "/health/ready", None, None, "Readiness.",
          versioned=False),
    Route("brand_new", "meta", "GET", "/brand-new", None, None, "Unknown to the OpenAPI builder.",
          versioned=False),
)
EXTENDED = ROUTES + tuple(row for row in META_ROWS if row.name not in ROUTES_BY_NAME)
"""The table plus whichever of those rows it does not have yet."""


def _document(require_auth: frozenset[str] = frozenset(), routes: Any = ROUTES) -> dict[str, Any]:
    return openapi_document(routes, require_auth, SERVER)


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def _klein_operations() -> tuple[set[tuple[str, str]], set[str]]:
    """(path, method) of every Klein route, and the bases of branch routes."""
    operations: set[tuple[str, str]] = set()
    branches: set[str] = set()
    for rule in Gateway.app.url_map.iter_rules():
        methods = set(rule.methods or ()) - {"HEAD"}
        if methods == {"OPTIONS"}:
            continue  # CORS preflight, documented in info.description
        if rule.rule.endswith("/<path:__rest__>"):
            # Klein's branch=True sibling: a subtree (Swagger UI's assets)
            # under a documented route, not an operation of its own.
            branches.add(rule.rule[: -len("/<path:__rest__>")])
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        operations |= {(path, method.lower()) for method in methods - {"OPTIONS"}}
    return operations, branches


class DocumentTests(SynchronousTestCase):
    def test_document_validates(self) -> None:
        """The document passes openapi-spec-validator with and without REQUIRE_AUTH."""
        for require_auth in (frozenset(), frozenset({"data"}), frozenset({"data", "analytics"})):
            document = _document(require_auth)
            self.assertEqual(document["openapi"], OPENAPI_VERSION)
            validate(document)

    def test_document_with_meta_rows_validates(self) -> None:
        """Rows added to the table later (docs, UI, metrics, readiness) validate too."""
        validate(_document(routes=EXTENDED))

    def test_document_is_json(self) -> None:
        """The document survives a JSON round trip unchanged (it is served as JSON)."""
        document = _document()
        self.assertEqual(json.loads(json.dumps(document)), document)

    def test_every_klein_route_is_documented_and_vice_versa(self) -> None:
        """The document lists the Klein routes, each once: those under /api/v1 are its alias."""
        klein, branches = _klein_operations()
        documented = set(_operations(_document()))
        self.assertTrue(klein)
        self.assertEqual({(path, m) for path, m in klein if not path.startswith("/api/v1/")}, documented)
        self.assertEqual(
            {(path, m) for path, m in klein if path.startswith("/api/v1/")},
            {("/api/v1" + path[len("/api"):], m) for path, m in documented if path.startswith("/api/")},
        )
        for base in branches:
            if not base.startswith("/api/v1/"):
                self.assertIn(base, _document()["paths"])

    def test_each_route_is_listed_once_and_the_alias_is_named(self) -> None:
        """One operation per row, each under its /api path; /api/v1 is named in the description."""
        document = _document()
        operations = _operations(document)
        self.assertEqual(len(operations), len(ROUTES))
        for route in ROUTES:
            self.assertEqual(operations[(route.template, route.method.lower())]["operationId"], route.name)
        self.assertFalse([path for path in document["paths"] if path.startswith("/api/v1")])
        self.assertIn("also served under /api/v1", document["info"]["description"])

    def test_operation_ids_are_unique(self) -> None:
        """No two operations share an operationId."""
        ids = [op["operationId"] for op in _operations(_document(routes=EXTENDED)).values()]
        self.assertEqual(len(ids), len(set(ids)))

    def test_duplicate_rows_are_refused(self) -> None:
        """The same method on the same path twice is a table error, not a silent overwrite."""
        with self.assertRaises(ValueError):
            _document(routes=ROUTES + (ROUTES[0],))

    def test_servers_echo_the_given_url(self) -> None:
        """servers holds exactly the URL the caller built from the request."""
        self.assertEqual(_document()["servers"], [{"url": SERVER}])
        self.assertEqual(
            openapi_document(ROUTES, frozenset(), "http://127.0.0.1:8000")["servers"],
            [{"url": "http://127.0.0.1:8000"}],
        )

    def test_path_and_query_parameters(self) -> None:
        """{product} is a required string path parameter; the table's query params are listed."""
        operations = _operations(_document())
        for route in ROUTES:
            for path in [route.template]:
                parameters = operations[(path, route.method.lower())].get("parameters", [])
                path_params = {p["name"]: p for p in parameters if p["in"] == "path"}
                self.assertEqual(set(path_params), set(route.params))
                for parameter in path_params.values():
                    self.assertIs(parameter["required"], True)
                    self.assertEqual(parameter["schema"]["type"], "string")
                query = {p["name"]: p for p in parameters if p["in"] == "query"}
                self.assertEqual(set(query), {q.name for q in route.query})
        underlying = operations[("/api/data/underlying/{product}", "get")]
        limit = next(p for p in underlying["parameters"] if p["name"] == "limit")
        # The reference storage service answers 400 outside 1-1000.
        self.assertEqual(limit["schema"], {"type": "integer", "minimum": 1, "maximum": 1000})
        start = next(p for p in underlying["parameters"] if p["name"] == "start")
        self.assertEqual(start["schema"], {"type": "string", "format": "date-time"})

    def test_request_bodies(self) -> None:
        """register needs email, password (8+) and name; login email and password."""
        operations = _operations(_document())
        for prefix in ("/api",):
            register = operations[(prefix + "/auth/register", "post")]["requestBody"]
            schema = register["content"]["application/json"]["schema"]
            self.assertEqual(sorted(schema["required"]), ["email", "name", "password"])
            self.assertEqual(schema["properties"]["password"]["minLength"], 8)
            login = operations[(prefix + "/auth/login", "post")]["requestBody"]
            schema = login["content"]["application/json"]["schema"]
            self.assertEqual(sorted(schema["required"]), ["email", "password"])
        self.assertNotIn("requestBody", operations[("/api/auth/logout", "post")])

    def test_known_success_schemas(self) -> None:
        """health and user/me document the exact bodies the gateway writes."""
        operations = _operations(_document())
        health = operations[("/health", "get")]["responses"]["200"]
        schema = health["content"]["application/json"]["schema"]
        self.assertEqual(sorted(schema["required"]), ["service", "status", "version"])
        me = operations[("/api/user/me", "get")]["responses"]["200"]
        schema = me["content"]["application/json"]["schema"]
        self.assertEqual(sorted(schema["properties"]), ["email", "user_id"])
        register = operations[("/api/auth/register", "post")]["responses"]
        self.assertIn("201", register)

    def test_error_schema_is_shared(self) -> None:
        """Error is {"error": string, ...} with error required, used by every error response."""
        document = _document()
        error = document["components"]["schemas"]["Error"]
        self.assertEqual(error["required"], ["error"])
        self.assertEqual(error["properties"]["error"]["type"], "string")
        self.assertIn("detail", error["properties"])  # RFC 9457 members are documented
        for response in document["components"]["responses"].values():
            for media_type in ("application/json", "application/problem+json"):
                self.assertEqual(
                    response["content"][media_type]["schema"],
                    {"$ref": "#/components/schemas/Error"},
                )

    def test_security_follows_require_auth(self) -> None:
        """bearerAuth is required where auth_policy says so, optional where a token is accepted."""
        for require_auth in (frozenset(), frozenset({"data"}), frozenset({"data", "analytics"})):
            operations = _operations(_document(require_auth))
            for route in ROUTES:
                policy = auth_policy(route, require_auth)
                for path in [route.template]:
                    security = operations[(path, route.method.lower())]["security"]
                    if policy == REQUIRED or route.pass_authorization:
                        self.assertEqual(security, [{BEARER: []}], (path, require_auth))
                    elif route.group in ("data", "analytics"):
                        self.assertEqual(security, [{}, {BEARER: []}], (path, require_auth))
                    else:
                        self.assertEqual(security, [], (path, require_auth))

    def test_require_auth_examples(self) -> None:
        """Spelled out: REQUIRE_AUTH=data protects data, not analytics; user/me is always protected."""
        operations = _operations(_document(frozenset({"data"})))
        self.assertEqual(operations[("/api/data/products", "get")]["security"], [{BEARER: []}])
        self.assertIn("401", operations[("/api/data/products", "get")]["responses"])
        pcr = operations[("/api/analytics/pcr/{product}", "get")]
        self.assertEqual(pcr["security"], [{}, {BEARER: []}])
        self.assertNotIn("401", pcr["responses"])
        self.assertEqual(operations[("/api/user/me", "get")]["security"], [{BEARER: []}])
        self.assertEqual(operations[("/health", "get")]["security"], [])
        scheme = _document()["components"]["securitySchemes"][BEARER]
        self.assertEqual((scheme["type"], scheme["scheme"]), ("http", "bearer"))

    def test_error_statuses_where_expected(self) -> None:
        """400/404 with path params, 401 with required tokens, 413 on POST, 429 off meta, 503 upstream."""
        require_auth = frozenset({"analytics"})
        operations = _operations(_document(require_auth, routes=EXTENDED))
        for route in EXTENDED:
            policy = auth_policy(route, require_auth)
            for path in [route.template]:
                responses = operations[(path, route.method.lower())]["responses"]
                where = f"{route.method} {path}"
                self.assertEqual("404" in responses,
                                 bool(route.params) or route.name in ("metrics", "admin_cache"),
                                 where)
                if route.params:
                    self.assertIn("400", responses, where)
                self.assertEqual(
                    "401" in responses,
                    policy == REQUIRED or route.pass_authorization or route.name == "auth_login",
                    where,
                )
                self.assertEqual("413" in responses, route.method == "POST", where)
                self.assertEqual("429" in responses, route.group != "meta", where)
                if route.service is not None or policy == REQUIRED:
                    self.assertIn("503", responses, where)
                if route.group == "meta" and route.name != "health_ready":
                    self.assertNotIn("503", responses, where)
                self.assertIn("default", responses, where)

    def test_forwarded_gets_document_the_cache_headers(self) -> None:
        """Cache-Status and Age are documented on exactly the forwarded GETs (the cached routes)."""
        document = openapi_document(ROUTES, frozenset(), "/")
        with_cache = sorted(
            f"{method.upper()} {path}"
            for path, item in document["paths"].items()
            for method, operation in item.items()
            if any("Cache-Status" in answer.get("headers", {})
                   for status, answer in operation["responses"].items() if status.startswith("2"))
        )
        cached = sorted(
            f"GET {route.public_paths[0]}" for route in ROUTES
            if route.service is not None and route.method == "GET" and not route.composed
        )
        self.assertEqual(with_cache, cached)
        self.assertEqual(len(cached), 5)
        self.assertIn("Age", document["components"]["headers"])

    def test_retry_headers_on_429_and_503(self) -> None:
        """429 carries Retry-After and the RateLimit fields; 503 carries Retry-After."""
        responses = _document()["components"]["responses"]
        self.assertIn("Retry-After", responses["RateLimited"]["headers"])
        self.assertIn("RateLimit-Policy", responses["RateLimited"]["headers"])
        self.assertIn("RateLimit", responses["RateLimited"]["headers"])
        self.assertIn("Retry-After", responses["ServiceUnavailable"]["headers"])
        self.assertIn("WWW-Authenticate", responses["Unauthorized"]["headers"])

    def test_tags_by_group(self) -> None:
        """Operations are tagged Authentication / Data / Analytics / User / Meta by group."""
        document = _document(routes=EXTENDED)
        operations = _operations(document)
        expected = {"auth": "Authentication", "data": "Data", "analytics": "Analytics",
                    "user": "User", "meta": "Meta"}
        for route in EXTENDED:
            for path in [route.template]:
                self.assertEqual(operations[(path, route.method.lower())]["tags"],
                                 [expected[route.group]])
        self.assertEqual([t["name"] for t in document["tags"]], list(expected.values()))

    def test_meta_rows_get_their_media_types(self) -> None:
        """The UI is HTML, metrics are Prometheus text, an unknown row gets a JSON default."""
        operations = _operations(_document(routes=EXTENDED))

        def media(path: str) -> list[str]:
            return list(operations[(path, "get")]["responses"]["200"]["content"])

        self.assertEqual(media("/api/docs"), ["application/json"])
        self.assertEqual(media("/api/docs/ui"), ["text/html"])
        self.assertEqual(media("/metrics"), ["text/plain; version=0.0.4"])
        self.assertEqual(media("/brand-new"), ["application/json"])
        self.assertIn("503", operations[("/health/ready", "get")]["responses"])

    def test_document_is_a_fresh_copy(self) -> None:
        """Changing one document does not change the next one."""
        first = _document()
        first["components"]["schemas"]["Error"]["required"].append("oops")
        first["paths"]["/api/data/chain/{product}"]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]["properties"].clear()
        second = _document()
        self.assertEqual(second["components"]["schemas"]["Error"]["required"], ["error"])
        self.assertTrue(second["paths"]["/api/data/chain/{product}"]["get"]["responses"]["200"][
            "content"]["application/json"]["schema"]["properties"])


class _UIApp:
    """A Klein app that hands /api/docs/ui and below to the UI, as the gateway does."""

    app = Klein()

    def __init__(self) -> None:
        self.ui = SwaggerUIResource(spec_url="/api/docs", base_path="/api/docs/ui")

    @app.route("/api/docs/ui", methods=["GET"], branch=True)
    def docs_ui(self, request: Any) -> Any:
        return self.ui


class SwaggerUITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stub = StubTreq(_UIApp().app.resource())

    def _get(self, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = self.successResultOf(self.stub.get("http://gw.test" + path, **kwargs))
        return response, self.successResultOf(response.content())

    def test_index_page(self) -> None:
        """/api/docs/ui is HTML loading the assets from absolute paths under itself."""
        response, body = self._get("/api/docs/ui")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        for name in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                     INITIALIZER):
            self.assertIn(f'"/api/docs/ui/{name}"'.encode(), body)
        self.assertNotIn(b"http", body.replace(b"charset", b""))  # no CDN, no absolute URL

    def test_initializer_points_at_the_document(self) -> None:
        """The generated initializer loads /api/docs, not the bundle's petstore."""
        response, body = self._get("/api/docs/ui/" + INITIALIZER)
        self.assertEqual(response.code, 200)
        self.assertIn(b'url: "/api/docs"', body)
        self.assertNotIn(b"petstore", body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/javascript; charset=utf-8"])

    def test_bundled_assets_served_with_content_types(self) -> None:
        """Each listed file comes from the package, byte for byte, with its type."""
        for name, content_type in BUNDLED_ASSETS.items():
            response, body = self._get("/api/docs/ui/" + name)
            self.assertEqual(response.code, 200, name)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [content_type])
            self.assertEqual(response.headers.getRawHeaders(b"x-content-type-options"),
                             [b"nosniff"])
            self.assertEqual(body, swagger_ui_bundle.swagger_ui_path.joinpath(name).read_bytes())

    def test_etag_revalidation(self) -> None:
        """A matching If-None-Match gets 304 without the body."""
        response, _ = self._get("/api/docs/ui/swagger-ui.css")
        (etag,) = response.headers.getRawHeaders(b"etag")
        response, body = self._get("/api/docs/ui/swagger-ui.css",
                                   headers={b"If-None-Match": etag})
        self.assertEqual((response.code, body), (304, b""))

    def test_unlisted_and_traversal_paths_are_404(self) -> None:
        """Unlisted files, deeper paths and encoded traversal all get the JSON 404."""
        for path in (
            "/api/docs/ui/index.html",  # the bundle's own, pointing at petstore
            "/api/docs/ui/index.j2",
            "/api/docs/ui/nope.js",
            "/api/docs/ui/swagger-ui.css/x",
            "/api/docs/ui/%2e%2e",
            "/api/docs/ui/%2e%2e%2f%2e%2e%2f__init__.py",
            "/api/docs/ui/..%2f__init__.py",
            "/api/docs/ui/%2fetc%2fpasswd",
            "/api/docs/ui/x/%2e%2e/swagger-ui.css",
            "/api/docs/ui/%C3%A9",
        ):
            response, body = self._get(path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(json.loads(body)["error"], "Not found", path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             [b"application/json"], path)

    def test_head_has_no_body(self) -> None:
        """HEAD on an asset answers the headers only."""
        response = self.successResultOf(self.stub.head("http://gw.test/api/docs/ui/index.css"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"")

    def test_spec_url_is_escaped(self) -> None:
        """A spec URL cannot break out of the script (it is a JSON string literal)."""
        ui = SwaggerUIResource(spec_url='/x"</script><script>alert(1)//')
        body = ui.asset(INITIALIZER).body  # type: ignore[union-attr]
        self.assertNotIn(b"</script>", body)
        self.assertIn(b'url: "/x\\"<\\/script>', body)


class ServerURLTests(SynchronousTestCase):
    def test_public_url_wins(self) -> None:
        """PUBLIC_URL, when set, whatever the Host."""
        from deltagw.web.openapi import server_url

        self.assertEqual(
            server_url("https://api.example.com", False, b"evil.example", "127.0.0.1:8000"),
            "https://api.example.com",
        )

    def test_host_only_when_it_names_the_listening_address(self) -> None:
        """The request's scheme and Host when the Host is the address it arrived at."""
        from deltagw.web.openapi import server_url

        self.assertEqual(server_url(None, False, b"127.0.0.1:8000", "127.0.0.1:8000"),
                         "http://127.0.0.1:8000")
        self.assertEqual(server_url(None, True, b"[::1]:8443", "[::1]:8443"), "https://[::1]:8443")

    def test_any_other_host_gives_the_relative_url(self) -> None:
        """A Host the client invented is never reflected: "/" instead."""
        from deltagw.web.openapi import server_url

        for host in (None, b"", b"evil.example", b"evil.example:8000", b"127.0.0.1:9999",
                     b"evil.com/path", b"a b", b'x"y', b"h\xc3\xa9", b"host:port"):
            self.assertEqual(server_url(None, False, host, "127.0.0.1:8000"), "/", host)
        validate(openapi_document(ROUTES, frozenset(), "/"))
