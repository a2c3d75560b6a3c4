"""Calibration for the benchmark: the least a Twisted proxy does per request.

``python bench/baseline_proxy.py PORT UPSTREAM`` relays each GET to
``UPSTREAM + path`` with a pooled ``twisted.web.client.Agent``: no Klein, no
logging, no limiter. Its CPU per request is the floor under the gateway's.
"""

import sys

from twisted.internet import reactor
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody


class Proxy(resource.Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream: bytes) -> None:
        super().__init__()
        self.agent, self.upstream = agent, upstream

    def render_GET(self, request: server.Request) -> int:
        lost = []
        answer = self.agent.request(b"GET", self.upstream + request.uri)
        # The client went away: stop the upstream call and never finish the request.
        request.notifyFinish().addErrback(lambda f: (lost.append(f), answer.cancel()))

        def relay(response):
            request.setResponseCode(response.code)
            for value in response.headers.getRawHeaders(b"content-type", []):
                request.responseHeaders.addRawHeader(b"content-type", value)
            return readBody(response).addCallback(request.write)

        def finish(failed: bool) -> None:
            if not lost:
                if failed:
                    request.setResponseCode(502)
                request.finish()

        answer.addCallback(relay).addCallbacks(lambda _: finish(False), lambda _: finish(True))
        return server.NOT_DONE_YET


if __name__ == "__main__":
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.retryAutomatically, pool.maxPersistentPerHost, pool.cachedConnectionTimeout = False, 128, 60
    site = server.Site(Proxy(Agent(reactor, pool=pool), sys.argv[2].encode()))
    site.log = lambda request: None  # no access log
    reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
    reactor.run()
