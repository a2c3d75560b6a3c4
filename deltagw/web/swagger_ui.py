"""Swagger UI for the OpenAPI document, served from a Python package's files.

The HTML, stylesheets and scripts come from the ``swagger-ui-bundle``
distribution installed with the gateway, so the page works without any CDN
(air-gapped deployments, strict egress) and its version is pinned by the
install, not by whatever a CDN serves today.

Only a fixed list of files is ever served: a request names one of them
exactly or gets the gateway's JSON 404, so no client path is ever joined to
a filesystem path (no traversal, however the segments are encoded). The
index page and the initializer script are generated here, pointing at the
gateway's own document instead of the bundle's petstore example.
"""

from __future__ import annotations

import hashlib
import html
import json

import swagger_ui_bundle
from twisted.web import http
from twisted.web.resource import Resource

from deltagw.errors import NotFound, write_error
from deltagw.web.site import GatewayRequest

_JS = b"text/javascript; charset=utf-8"  # RFC 9239
_CSS = b"text/css; charset=utf-8"
_HTML = b"text/html; charset=utf-8"

BUNDLED_ASSETS: dict[str, bytes] = {
    "swagger-ui.css": _CSS,
    "index.css": _CSS,
    "swagger-ui-bundle.js": _JS,
    "swagger-ui-standalone-preset.js": _JS,
    "favicon-16x16.png": b"image/png",
    "favicon-32x32.png": b"image/png",
}
"""The bundle's files that the page uses, with their content types."""

INITIALIZER = "swagger-initializer.js"

CACHE_CONTROL = b"public, max-age=3600"
"""Assets change only when the package is upgraded; an hour of caching saves
reloading ~1.5 MB of script per visit while an upgrade shows up the same day."""

_INDEX = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="{base}/swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="{base}/index.css">
    <link rel="icon" type="image/png" href="{base}/favicon-32x32.png" sizes="32x32">
    <link rel="icon" type="image/png" href="{base}/favicon-16x16.png" sizes="16x16">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{base}/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="{base}/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="{base}/{initializer}" charset="UTF-8"></script>
  </body>
</html>
"""

_INITIALIZER = """window.onload = function () {{
  window.ui = SwaggerUIBundle({{
    url: {spec_url},
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
    // Else Swagger UI sends the document's URL to validator.swagger.io
    // whenever the page is not on localhost: nothing leaves the gateway.
    validatorUrl: null
  }});
}};
"""


class _File(Resource):
    """One in-memory file with its content type and a strong ETag."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'

    def render_GET(self, request: GatewayRequest) -> bytes:
        request.setHeader(b"Content-Type", self.content_type)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        if request.setETag(self.etag) == http.CACHED:
            return b""
        return self.body

    render_HEAD = render_GET


class _NotFound(Resource):
    """The gateway's JSON 404, whatever the method."""

    isLeaf = True

    def render(self, request: GatewayRequest) -> bytes:
        request.outcome = getattr(request, "outcome", None) or NotFound.outcome
        return write_error(request, NotFound())


class SwaggerUIResource(Resource):
    """Swagger UI: the page at ``base_path``, its files at ``base_path/<file>``.

    Mount it where a Klein ``branch=True`` route hands off to it: the route's
    own segments are already in ``request.prepath`` and ``request.postpath``
    holds the rest (empty for the page itself, one file name for an asset).

    Args:
        spec_url: URL of the OpenAPI document the page loads (``/api/docs``).
        base_path: Public path of the page; asset URLs are made absolute
            under it so the page works with or without a trailing slash.
        title: The page title.
    """

    def __init__(
        self,
        spec_url: str = "/api/docs",
        base_path: str = "/api/docs/ui",
        title: str = "DeltaStream API gateway",
    ) -> None:
        super().__init__()
        base = base_path.rstrip("/")
        index = _INDEX.format(
            title=html.escape(title),
            base=html.escape(base, quote=True),
            initializer=INITIALIZER,
        )
        # json.dumps makes the URL a JS string literal; "</" is escaped so a
        # URL can never close a script element.
        initializer = _INITIALIZER.format(spec_url=json.dumps(spec_url).replace("</", "<\\/"))
        self.index = _File(index.encode("utf-8"), _HTML)
        self._generated = {INITIALIZER: _File(initializer.encode("utf-8"), _JS)}
        self._bundled: dict[str, _File] = {}

    def asset(self, name: str) -> _File | None:
        """The file called ``name``, or None when it is not one we serve.

        Bundled files are read on first use and kept in memory.
        """
        if name in self._generated:
            return self._generated[name]
        if name not in BUNDLED_ASSETS:
            return None
        found = self._bundled.get(name)
        if found is None:
            body = swagger_ui_bundle.swagger_ui_path.joinpath(name).read_bytes()
            found = self._bundled[name] = _File(body, BUNDLED_ASSETS[name])
        return found

    def render_GET(self, request: GatewayRequest) -> bytes:
        return self.index.render_GET(request)

    render_HEAD = render_GET

    def getChild(self, path: bytes, request: GatewayRequest) -> Resource:
        # Exactly one segment, naming a listed file: anything deeper, any
        # "..", any encoded "/" or odd byte simply names no listed file.
        if request.postpath:
            return _NotFound()
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            return _NotFound()
        return self.asset(name) or _NotFound()
