"""Holding many idle keep-alive connections on the gateway, and what they cost it."""

from __future__ import annotations

import errno
import re
import selectors
import socket
import time
from collections import Counter
from typing import Any

from harness.cpu_memory import proc_memory_mb
from harness.locations import LOOPBACK
from harness.polling import http_get


def response_complete(head: bytes, body: bytes) -> bool:
    """Whether ``body`` holds the whole body (Content-Length or chunked)."""
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if m:
        return len(body) >= int(m.group(1))
    if not re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        return False  # read-until-close bodies do not keep the connection
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return False
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return body.find(b"\r\n\r\n", eol) == eol or body.endswith(b"\r\n\r\n")
        pos = eol + 2 + size + 2
        if pos > len(body):
            return False


class IdleConnectionOpener:
    """Opens keep-alive connections without blocking, one ``GET /health`` each,
    and keeps those answered 200 open.

    At most ``max_pending`` connections are connecting or waiting for their
    answer at a time: the gateway listens with Twisted's default backlog (50),
    and a burst of SYNs beyond it would measure SYN retransmission, not the
    gateway.
    """

    def __init__(self, port: int, wanted: int, max_pending: int) -> None:
        self.port = port
        self.wanted = wanted
        self.max_pending = max_pending
        self.request = (f"GET /health HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                        f"Connection: keep-alive\r\n\r\n").encode()
        self.selector = selectors.DefaultSelector()
        self.held: list[socket.socket] = []
        self.buffers: dict[socket.socket, bytearray] = {}
        self.errors: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.opened = self.finished = self.pending = 0

    def establish(self, deadline: float) -> None:
        """Open all ``wanted`` connections; at ``deadline`` count the rest as errors."""
        while self.finished < self.wanted:
            if time.monotonic() > deadline:
                self.errors["deadline passed"] += self.wanted - self.finished
                break
            self.open_more()
            for key, _ in self.selector.select(timeout=0.5):
                if key.data == "connecting":
                    self.send_request(key.fileobj)
                else:
                    self.read_answer(key.fileobj)

    def open_more(self) -> None:
        """Start connecting until ``max_pending`` are in progress."""
        while self.opened < self.wanted and self.pending < self.max_pending:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((LOOPBACK, self.port))
            self.opened += 1
            self.pending += 1
            if err not in (0, errno.EINPROGRESS):
                self.errors[f"connect: {errno.errorcode.get(err, err)}"] += 1
                self.finished += 1
                self.pending -= 1
                sock.close()
                continue
            self.selector.register(sock, selectors.EVENT_WRITE, "connecting")

    def send_request(self, sock: socket.socket) -> None:
        """The connection is writable: connected (or failed); send the request."""
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(sock, f"connect: {errno.errorcode.get(err, err)}")
            return
        try:
            sent = sock.send(self.request)
        except OSError as e:
            self.fail(sock, f"send: {e.strerror}")
            return
        if sent != len(self.request):
            self.fail(sock, "send: short write")
            return
        self.buffers[sock] = bytearray()
        self.selector.modify(sock, selectors.EVENT_READ, "reading")

    def read_answer(self, sock: socket.socket) -> None:
        """Read what arrived; once the whole response is in, settle the connection."""
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(sock, f"recv: {e.strerror}")
            return
        if not data:
            self.fail(sock, "closed before the response")
            return
        buf = self.buffers[sock]
        buf += data
        head, sep, body = bytes(buf).partition(b"\r\n\r\n")
        if sep and response_complete(head, body):
            self.answered(sock, int(head.split(None, 2)[1]))

    def answered(self, sock: socket.socket, status: int) -> None:
        """Hold the connection if the answer was 200; otherwise count it and close it."""
        self.statuses[status] += 1
        self.selector.unregister(sock)
        del self.buffers[sock]
        self.pending -= 1
        self.finished += 1
        if status == 200:
            self.held.append(sock)
        else:
            self.errors[f"status {status}"] += 1
            sock.close()

    def fail(self, sock: socket.socket, why: str) -> None:
        """Count the failure and close the connection."""
        self.errors[why] += 1
        self.finished += 1
        self.pending -= 1
        self.selector.unregister(sock)
        self.buffers.pop(sock, None)
        sock.close()

    def count_closed(self) -> int:
        """How many held connections the gateway has closed: a closed one reads as EOF."""
        poller = selectors.DefaultSelector()
        for sock in self.held:
            poller.register(sock, selectors.EVENT_READ)
        closed = 0
        for key, _ in poller.select(timeout=0):
            try:
                if key.fileobj.recv(1, socket.MSG_PEEK) == b"":
                    closed += 1
            except OSError:
                closed += 1
        poller.close()
        return closed

    def close(self) -> None:
        """Close every connection, held or still in progress."""
        for sock in self.held:
            sock.close()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def hold_idle_connections(port: int, n: int, pid: int, deadline_s: float = 90.0,
                          max_pending: int = 40) -> dict[str, Any]:
    """Open ``n`` keep-alive connections, one ``GET /health`` each, and hold them.

    While all are held: the gateway's memory, how many it closed, and whether
    it still answers ``/health`` on a new connection.
    """
    opener = IdleConnectionOpener(port, n, max_pending)
    started = time.monotonic()
    try:
        opener.establish(started + deadline_s)
        established_s = time.monotonic() - started
        memory = proc_memory_mb(pid)
        closed = opener.count_closed()
        still_open = len(opener.held) - closed
        # The gateway must still answer while they are all held.
        health = http_get(f"http://{LOOPBACK}:{port}/health", 5)[0]
    finally:
        opener.close()
    return {
        "requested": n,
        "answered_200": opener.statuses.get(200, 0),
        "held": still_open,
        "closed_by_gateway": closed,
        "errors": dict(opener.errors),
        "seconds_to_establish": round(established_s, 2),
        "rss_mb_while_held": round(memory["VmRSS"], 1),
        "hwm_mb_while_held": round(memory["VmHWM"], 1),
        "health_while_held": health,
    }
