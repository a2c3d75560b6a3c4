"""Unit tests: Clock, StringTransport and plain functions, never a socket."""

from __future__ import annotations

import socket
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a socket fails the test: one that needs the network is an integration test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test opened a socket; it belongs in tests/integration")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
