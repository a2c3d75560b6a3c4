"""`RateLimits.check_at_once`: a request's budget spent without waiting, or not at all."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from deltagw.config import load_settings
from deltagw.errors import RateLimited
from deltagw.policy.rate_limits import NotAtOnce, RateLimits
from deltagw.routes import ROUTES_BY_NAME

DATA = ROUTES_BY_NAME["data_products"]


def _limits(**env: str) -> RateLimits:
    return RateLimits(load_settings({"RATE_LIMIT_REQUESTS": "2", "RATE_LIMIT_WINDOW": "60", **env}),
                      Clock())


def test_it_spends_as_check_does_and_a_refusal_spends_nothing():
    limits = _limits()
    assert [limits.check_at_once(DATA, "192.0.2.1").remaining for _ in range(2)] == [1, 0]
    with pytest.raises(NotAtOnce):
        limits.check_at_once(DATA, "192.0.2.1")
    # The refusal left the bucket as it was: check refuses it in turn, with its 429.
    refused: list[Failure] = []
    defer.ensureDeferred(limits.check(DATA, "192.0.2.1", None)).addErrback(refused.append)
    assert refused[0].check(RateLimited)


def test_a_route_or_budget_without_a_limit_is_none():
    assert _limits().check_at_once(ROUTES_BY_NAME["health"], "192.0.2.1") is None
    assert _limits(RATE_LIMIT_REQUESTS="0").check_at_once(DATA, "192.0.2.1") is None


def test_a_budget_in_redis_is_not_decided_at_once():
    with pytest.raises(NotAtOnce):
        _limits(REDIS_URL="unix:///nonexistent/redis.sock").check_at_once(DATA, "192.0.2.1")
