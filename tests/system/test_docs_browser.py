"""Swagger UI at /api/docs/ui, used in a real headless Chromium against a real
``twistd -n deltagw --demo``: every operation of the document is rendered,
"Try it out" performs the call through the gateway and shows its 200 answer,
and the page makes the browser contact no host but the gateway (no CDN, no
validator.swagger.io).

Chromium is Debian's ``chromium`` package; the test fails when it is missing
(.ci/run installs it). It is driven over the DevTools protocol on
``--remote-debugging-pipe`` (JSON messages ended by NUL on the browser's fds
3 and 4), so no WebSocket client is needed.

What the browser asks for is read from two independent records:

* DevTools: every ``Network.requestWillBeSent`` of the page, and of any
  worker or out-of-process frame it starts (auto-attached, held until its
  Network domain is on);
* Chromium's NetLog, written by the network service for the whole browser:
  every URL request, every host resolution (which also shows
  ``<link rel=preconnect>`` and DNS prefetch, which DevTools does not), and
  every TCP connection attempted.

Every TCP connection in the NetLog must go to the gateway. URL requests and
host resolutions are checked for those made on the page's behalf (initiated
by the gateway's origin or keyed to its site): Chromium also asks Google
hosts for updates and sign-in state by itself, whatever the page, and those
are its own, not the page's. ``--host-resolver-rules`` makes every other
host unresolvable so that nothing can leave the machine from CI, but the
assertions look at what was *asked for*: a request to another host made on
purpose once the checks are done (``CANARY``) must show up in each record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from deltagw.routes import ROUTES
from tests.daemon import Twistd
from tests.support import eventually, wait_until

COMMAND_TIMEOUT = 15.0
"""Seconds one DevTools command may take before the test fails."""

CANARY = "http://cdn.invalid/swagger-ui-bundle.js"
"""Fetched by the page on purpose once the checks are done, to show that each
record would show a request to another host (``.invalid`` never resolves)."""

TRY_IT_OUT = {
    # path: (DOM id of its block, check of the JSON body shown)
    "/health": ("operations-Meta-health", lambda body: body["status"] == "healthy"),
    "/api/data/products": ("operations-Data-data_products", lambda body: "NIFTY" in body["products"]),
}
"""Public operations tried in the page: one the gateway answers itself, one it
forwards to the demo's storage service."""

HOST = "deltagw.test"
"""The gateway's name in the browser (mapped to 127.0.0.1): Swagger UI never
asks validator.swagger.io about a document on localhost or 127.0.0.1, so
under those names the page could not show that it does not."""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-features=AutofillServerCommunication,NetworkTimeServiceQuerying,"
    "OptimizationHints,Translate,MediaRouter",
    "--window-size=1280,1024",
    # The gateway has a name; nothing can leave the machine: every other
    # host fails to resolve (the checks below do not rely on it).
    f"--host-resolver-rules=MAP {HOST} 127.0.0.1, MAP * ~NOTFOUND",
)


def chromium() -> str:
    """The Chromium binary; a missing one fails the test."""
    path = shutil.which("chromium")
    assert path, "chromium not found: apt-get install chromium (.ci/run does)"
    return path


class DevToolsPipe(protocol.ProcessProtocol):
    """Chromium with ``--remote-debugging-pipe``: commands go to its fd 3,
    answers and events come from its fd 4, each one JSON text ended by NUL.

    Every event is kept in ``events``. A child target held at start by
    ``Target.setAutoAttach`` (a worker, a frame in another process) gets its
    Network domain enabled before it is let run, so its requests are recorded
    too.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.next_id = 0
        self.pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.output = bytearray()
        self.running = False
        self.exit_code: int | None = None

    def connectionMade(self) -> None:
        self.running = True

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 4:  # stdout, stderr: kept (the end of them) for failure messages
            self.output += data
            del self.output[:-20000]
            return
        self.buffer += data
        *messages, self.buffer = self.buffer.split(b"\0")
        for message in messages:
            self.received(json.loads(message))

    def received(self, message: dict[str, Any]) -> None:
        if "id" in message:
            waiting = self.pending.pop(message["id"], None)
            if waiting is not None:
                if "error" in message:
                    waiting.errback(AssertionError(f"DevTools error: {message['error']}"))
                else:
                    waiting.callback(message.get("result", {}))
            return
        self.events.append(message)
        params = message.get("params", {})
        if message["method"] == "Target.attachedToTarget" and params.get("waitingForDebugger"):
            child = params["sessionId"]
            for method in ("Network.enable", "Runtime.runIfWaitingForDebugger"):
                self.send(method, session=child).addErrback(lambda _: None)

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> defer.Deferred[dict[str, Any]]:
        """Send one command; the Deferred fires with its result."""
        if not self.running:
            return defer.fail(AssertionError(f"{method}: chromium is not running:\n{self.log()}"))
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        answer: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.pending[self.next_id] = answer
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")

        def timed_out(_: Any, timeout: float) -> None:
            raise AssertionError(f"{method}: no answer from chromium within {timeout} s")

        answer.addTimeout(COMMAND_TIMEOUT, reactor, onTimeoutCancel=timed_out)
        return answer

    def processEnded(self, reason: Any) -> None:
        self.running = False
        self.exit_code = reason.value.exitCode
        for waiting in list(self.pending.values()):
            waiting.errback(AssertionError(f"chromium exited:\n{self.log()}"))
        self.pending.clear()

    def log(self) -> str:
        return self.output.decode(errors="replace")[-3000:]


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: DevToolsPipe, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        })
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element, as a person would
        make it, once the element is there, scrolled to, and not covered."""

        async def clickable() -> Any:
            return await self.evaluate(f"""(() => {{
                const element = document.querySelector({json.dumps(selector)});
                if (!element) return null;
                element.scrollIntoView({{block: "center"}});
                const box = element.getBoundingClientRect();
                const x = box.left + box.width / 2, y = box.top + box.height / 2;
                const hit = document.elementFromPoint(x, y);
                return hit && element.contains(hit) ? {{x, y}} : null;
            }})()""")

        at = await until(clickable, f"{selector} to be there to click")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {
                "type": kind, "x": at["x"], "y": at["y"], "button": "left", "clickCount": 1,
            })


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10,
                ready: Callable[[Any], bool] = bool) -> Any:
    """The first value of ``check()`` that is ``ready``, polled with a
    deadline; failing, says what was awaited and the last value seen."""
    last: list[Any] = [None]

    async def remembered() -> bool:
        last[0] = await check()
        return ready(last[0])

    try:
        await eventually(remembered, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"waited {timeout} s for {what}; last seen: {last[0]!r}") from None
    return last[0]


async def open_page(browser: DevToolsPipe) -> Page:
    """A new blank tab whose requests (and its children's) are recorded."""
    target = await browser.send("Target.createTarget", {"url": "about:blank"})
    attached = await browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
    page = Page(browser, attached["sessionId"])
    for method in ("Network.enable", "Page.enable", "Runtime.enable"):
        await page.send(method)
    await page.send("Target.setAutoAttach", {
        "autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True,
    })
    return page


def processes_marked(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``marker``: every
    process Chromium starts inherits it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


async def stop_chromium(browser: DevToolsPipe, marker: str) -> list[int]:
    """Close the browser (killing it if it will not go), then wait for every
    process it started to be gone. Returns those that were not (now killed)."""
    if browser.running:
        try:
            await browser.send("Browser.close")
        except AssertionError:
            pass  # it may exit before answering
        try:
            await wait_until(lambda: not browser.running, timeout=10)
        except AssertionError:
            browser.transport.signalProcess("KILL")
            await wait_until(lambda: not browser.running, timeout=10)
    try:
        await wait_until(lambda: not processes_marked(marker), timeout=10)
        return []
    except AssertionError:
        leaked = processes_marked(marker)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        return leaked


def on_gateway(url: str, origin: str) -> bool:
    """Whether ``url`` asks the gateway (at ``origin``) or no host at all
    (data: and blob: URLs hold the bytes themselves)."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or url == "about:blank" or f"{parts.scheme}://{parts.netloc}" == origin


def devtools_requests(events: list[dict[str, Any]]) -> list[str]:
    """Every URL the page (or a child of it) asked for, in order."""
    return [
        event["params"]["request"]["url"]
        for event in events
        if event["method"] == "Network.requestWillBeSent"
    ]


class NetLog:
    """The events of a NetLog file (written whole when Chromium exits cleanly)."""

    def __init__(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as failure:
            raise AssertionError(f"no complete NetLog at {path}: {failure}") from None
        self.types = document["constants"]["logEventTypes"]
        self.events = document["events"]

    def params(self, event_type: str) -> list[dict[str, Any]]:
        """The parameters of the events of one type that have any, in order."""
        wanted = self.types[event_type]
        return [event["params"] for event in self.events
                if event["type"] == wanted and event.get("params")]


def for_the_page(params: dict[str, Any], origin: str, key: str) -> bool:
    """Whether a NetLog request was made on the page's behalf: initiated by
    the gateway's origin, or keyed (``key``) to a top frame on its site."""
    site = origin.rsplit(":", 1)[0]  # a site has no port
    return params.get("initiator") == origin or str(params.get(key, "")).split(" ")[0] == site


def before(items: list[Any], last: Callable[[Any], bool]) -> tuple[list[Any], list[Any]]:
    """``items`` split before the first one for which ``last`` is true; that
    one must be there."""
    for index, item in enumerate(items):
        if last(item):
            return items[:index], items[index:]
    raise AssertionError(f"the canary request is not in the record: {items}")


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation of an OpenAPI document."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    }


def access_log(daemon: Twistd) -> list[dict[str, Any]]:
    """The gateway's ``outgoing_response`` events so far."""
    return [e for e in daemon.events() if e.get("event") == "outgoing_response"]


@pytest_twisted.ensureDeferred
async def test_swagger_ui_renders_tries_out_and_stays_on_the_gateway(tmp_path):
    """The page renders every operation (15 today); Try it out on GET /health and on
    GET /api/data/products goes through the gateway and shows the 200 answer;
    the page made the browser ask, resolve and connect to no other host."""
    binary = chromium()
    daemon = Twistd.plugin("--demo", "--demo-state", str(tmp_path / "demo"))
    browser = DevToolsPipe()
    marker = f"DELTAGW_BROWSER_TEST={uuid.uuid4().hex}"
    netlog = tmp_path / "netlog.json"
    home = tmp_path / "home"
    home.mkdir()
    pool = HTTPConnectionPool(reactor, persistent=False)
    leaked: list[int] = []
    try:
        port = await daemon.port()
        await wait_until(lambda: "DeltaStream is ready at" in daemon.output(), timeout=15)
        origin = f"http://{HOST}:{port}"
        response = await treq.get(f"http://127.0.0.1:{port}/api/docs", agent=Agent(reactor, pool=pool))
        assert response.code == 200
        expected = operations(await response.json())
        assert len(expected) == len(ROUTES), sorted(expected)

        name, value = marker.split("=")
        reactor.spawnProcess(
            browser, binary,
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             f"--log-net-log={netlog}", "about:blank"],
            env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                 "XDG_CACHE_HOME": str(home / ".cache"), name: value},
            childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )
        page = await open_page(browser)
        # The leak check at the end sees Chromium's processes by the marker.
        assert browser.transport.pid in processes_marked(marker), browser.log()
        navigated = await page.send("Page.navigate", {"url": origin + "/api/docs/ui"})
        assert "errorText" not in navigated, navigated

        # Every operation of the document, each once, and no error box.
        async def rendered() -> Any:
            return await page.evaluate("""(() => {
                const blocks = [...document.querySelectorAll(".opblock")];
                return blocks.length && blocks.map(block => [
                    block.querySelector(".opblock-summary-method").textContent,
                    block.querySelector(".opblock-summary-path").dataset.path]);
            })()""")

        shown = await until(rendered, "the operations to render", timeout=20)
        assert len(shown) == len(expected), shown
        assert {tuple(operation) for operation in shown} == expected
        assert await page.evaluate("document.querySelectorAll('.errors-wrapper').length") == 0

        for path, (block, check) in TRY_IT_OUT.items():
            here = f"#{block}"
            await page.click(f"{here} .opblock-summary-control")
            await page.click(f"{here} .try-out__btn")
            await page.click(f"{here} .execute")

            async def answered() -> Any:
                return await page.evaluate(f"""(() => {{
                    const live = document.querySelector("{here} .live-responses-table");
                    const status = live && live.querySelector(".response .response-col_status");
                    if (!status) return null;
                    const body = live.querySelector(".response-col_description .highlight-code code");
                    return {{
                        status: status.textContent.trim(),
                        details: live.querySelector(".response-col_description").textContent,
                        url: document.querySelector("{here} .request-url pre").textContent,
                        body: body && body.textContent,
                        headers: [...live.querySelectorAll(".headerline")].map(line => line.textContent.trim()),
                    }};
                }})()""")

            answer = await until(answered, f"the answer of {path} in the page",
                                 ready=lambda shown: bool(shown and shown["status"]))
            assert answer["status"] == "200", answer
            assert answer["url"] == origin + path, answer
            assert check(json.loads(answer["body"])), answer
            headers = dict(line.split(": ", 1) for line in answer["headers"])
            assert headers["server"] == "deltagw", answer
            # The gateway logged that very request (by the id it answered with).
            request_id = headers["x-request-id"]
            logged = await until(
                lambda: defer.succeed([e for e in access_log(daemon) if e["request_id"] == request_id]),
                f"the gateway's access log to show request {request_id}",
            )
            assert [(e["method"], e["path"], e["status_code"]) for e in logged] == [("GET", path, 200)]

        thrown = [e["params"] for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
        assert not thrown, thrown
        console_errors = [e["params"] for e in browser.events
                          if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"]
        assert not console_errors, console_errors

        # The canary: a request to another host, which each record must show.
        await page.evaluate(f"fetch({json.dumps(CANARY)}).then(() => 'fetched', e => String(e))")
        await until(lambda: defer.succeed(CANARY in devtools_requests(browser.events)),
                    "DevTools to report the canary request")
        leaked = await stop_chromium(browser, marker)
        assert browser.exit_code == 0, browser.log()

        # DevTools: the page's own requests, all to the gateway, the page,
        # its assets, the document and the two calls among them.
        asked, canary = before(devtools_requests(browser.events), lambda url: url == CANARY)
        assert [url for url in asked if not on_gateway(url, origin)] == []
        for path in ("/api/docs/ui", "/api/docs/ui/swagger-ui-bundle.js", "/api/docs", *TRY_IT_OUT):
            assert origin + path in asked, asked

        # NetLog: the whole browser.
        log = NetLog(netlog)
        connected = [params["address"] for params in log.params("TCP_CONNECT_ATTEMPT")]
        assert connected and set(connected) == {f"127.0.0.1:{port}"}, connected
        requests = [params["url"] for params in log.params("URL_REQUEST_START_JOB")
                    if "url" in params and for_the_page(params, origin, "network_isolation_key")]
        asked, canary = before(requests, lambda url: url == CANARY)
        assert [url for url in asked if not on_gateway(url, origin)] == [], requests
        assert origin + "/api/data/products" in asked, requests
        # Host resolutions (preconnect and DNS prefetch too), as the rules
        # above rewrite them: the gateway's name is 127.0.0.1, any other
        # host "~notfound", which only the canary's may be, and last.
        resolved = [params["host"] for params in log.params("HOST_RESOLVER_MANAGER_REQUEST")
                    if "host" in params and for_the_page(params, origin, "network_anonymization_key")]
        gateway = f"http://127.0.0.1:{port}"
        assert gateway in resolved, resolved
        assert [host for host in resolved if host != gateway] == ["http://~notfound"], resolved
        assert resolved[-1] == "http://~notfound", resolved
    finally:
        await pool.closeCachedConnections()
        if browser.transport is not None:
            leaked += await stop_chromium(browser, marker)
        await daemon.stop()
    assert not leaked, f"chromium processes left running (killed): {leaked}"
