"""Rate limiting: token buckets in process or in Redis, and their headers.

Each client key owns a bucket of ``capacity`` tokens that refills continuously
at ``capacity / window`` tokens per second; a request takes one token or is
refused. Refill is lazy: computed from the clock on each request, no job
touches every bucket. A missing bucket and a full bucket
behave identically, so full buckets are forgotten at no cost (the in-process
sweep, Redis key expiry).

`TokenBucketLimiter` lives in one process and answers synchronously (the hot
path pays no Deferred). `RedisLimiter` shares one budget between gateway
processes and answers with a Deferred; it has its own minimal RESP client,
see `RedisLimiter` for why.

`Decision.headers` renders the IETF draft-ietf-httpapi-ratelimit-headers
(-09/-10) fields plus the de-facto ``X-RateLimit-*`` ones.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from deltagw.logs import get_logger

GRACE = 1e-6
"""Seconds of refill forgiven to rounding.

Clock readings near the epoch are floats quantised to about 0.24 µs, and
refill is time × rate in binary floating point: a client that waited exactly
long enough (0.6 s at 100 per 60 s) must not be refused because its 0.6 s
came out as 0.59999976. A microsecond is far below anything a client could
exploit, or even measure across a network.
"""

_POLICY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


class RedisUnavailable(Exception):
    """The shared limiter could not decide (Redis down or slow), fail-closed.

    The gateway answers 503: refusing with 429 would blame the client for our
    outage, and letting the request through is what ``fail_open`` is for.
    """


class Decision(NamedTuple):
    """The outcome of one request against one bucket.

    A named tuple rather than a frozen dataclass: one is made for every
    limited request, and a frozen dataclass's ``__init__`` costs about twice
    a named tuple's.

    Attributes:
        allowed: Whether the request may proceed.
        limit: The bucket's capacity (the burst a client may send at once).
        remaining: Whole tokens left after this request (rounded down).
        reset_after: Seconds until the bucket is full again.
        retry_after: When refused, whole seconds until one token is back
            (rounded up, at least 1); 0 when allowed.
        window: Seconds over which ``limit`` tokens are refilled.
        policy: The policy name shown to clients in the RateLimit fields.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: int
    window: float
    policy: str = "default"

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Render the response header fields that describe this decision.

        ``RateLimit-Policy`` and ``RateLimit`` follow
        draft-ietf-httpapi-ratelimit-headers-10 §3 and §4: a Structured Field
        List whose Item is the policy name as an sf-string, with integer
        parameters ``q`` (quota), ``w`` (window, whole seconds, non-zero),
        ``r`` (remaining) and ``t`` (seconds until more quota). ``t`` is the
        time until the bucket is full when the request is allowed, and
        ``Retry-After`` when it is refused, because §6 says ``Retry-After``
        SHOULD NOT point earlier than ``t``, and on a refusal the next token
        (not a full bucket) is what the client waits for.

        ``X-RateLimit-Reset`` is seconds until full (a delta, not an epoch
        time, so client and server clocks need not agree).

        Returns:
            ``(name, value)`` pairs, ``Retry-After`` only when refused.
        """
        return _fields_of(self)


@functools.lru_cache(maxsize=256)
def _fields_of(decision: Decision) -> tuple[tuple[bytes, bytes], ...]:
    """`Decision.headers`, remembered for equal decisions.

    A client within its budget finds its bucket full again at each request
    and gets the same decision every time (`TokenBucketLimiter.consume`);
    equal decisions render to equal fields, so they are formatted once.
    """
    reset = _whole_seconds(decision.reset_after)
    t = reset if decision.allowed else decision.retry_after
    window = max(1, _whole_seconds(decision.window))
    policy = decision.policy.encode("ascii")
    fields = (
        (b"RateLimit-Policy", b'"%b";q=%d;w=%d' % (policy, decision.limit, window)),
        (b"RateLimit", b'"%b";r=%d;t=%d' % (policy, decision.remaining, t)),
        (b"X-RateLimit-Limit", b"%d" % decision.limit),
        (b"X-RateLimit-Remaining", b"%d" % decision.remaining),
        (b"X-RateLimit-Reset", b"%d" % reset),
    )
    if not decision.allowed:
        fields += ((b"Retry-After", b"%d" % decision.retry_after),)
    return fields


def _whole_seconds(seconds: float) -> int:
    """Round a delay up to whole seconds, forgiving floating-point dust."""
    return max(0, math.ceil(seconds - GRACE))


def _decision(
    allowed: bool, tokens: float, capacity: int, window: float, policy: str
) -> Decision:
    """Describe a bucket holding ``tokens`` after the request was decided.

    Both limiters end here so that their answers (and headers) agree to the
    token for the same bucket state.
    """
    interval = window / capacity
    tokens = max(0.0, tokens)
    return Decision(
        allowed=allowed,
        limit=capacity,
        remaining=min(capacity, math.floor(tokens + GRACE / interval)),
        reset_after=(capacity - tokens) * interval,
        retry_after=0 if allowed else max(1, _whole_seconds((1 - tokens) * interval)),
        window=window,
        policy=policy,
    )


@functools.lru_cache(maxsize=None)
def _full_bucket(capacity: int, window: float, policy: str) -> Decision:
    """What `TokenBucketLimiter.consume` decides for a full bucket, as its
    general case would: capacity tokens, one taken.

    One per bucket configuration (from settings, never from clients), kept
    here rather than by each limiter: a stopped gateway's limiter then
    leaves no decision of its own to the cycle collector.
    """
    return _decision(True, capacity - 1.0, capacity, window, policy)


def _check_bucket(capacity: int, window: float, policy: str) -> None:
    """Reject a bucket configuration that could never limit sensibly.

    Raises:
        ValueError: ``capacity`` < 1, ``window`` <= 0, or a policy name that
            is not 1-64 of ``[A-Za-z0-9_.-]`` (it appears unescaped in a
            Structured Field string and in Redis key names).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity!r}")
    if not window > 0:
        raise ValueError(f"window must be positive, got {window!r}")
    if not _POLICY_NAME.match(policy):
        raise ValueError(f"policy must be 1-64 of [A-Za-z0-9_.-], got {policy!r}")


class TokenBucketLimiter:
    """Token buckets for one process, keyed by client.

    A bucket is stored as one float, the time at which it will be full again
    (GCRA's "theoretical arrival time", the same algorithm as a token bucket):
    tokens now = ``capacity - (full_at - now) / interval``. Times are counted
    from the limiter's creation, not the epoch, so that adding intervals at
    small magnitudes stays exact to far below a microsecond.

    ``consume`` is synchronous and O(1). Memory is bounded twice over: a sweep
    (`start`) forgets buckets that are full again, and ``max_keys`` caps how
    many buckets exist at all, dropping the least recently touched.

    Dropping a bucket early is safe because a forgotten key starts again with
    a full bucket: the worst it can do is give that one client one extra
    burst (at most ``capacity`` requests), never refuse anyone wrongly. With a
    cap sized above the number of clients active within one window, only a
    flood of distinct keys (which a cap exists for) ever triggers it.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        capacity: int,
        window: float,
        max_keys: int = 100_000,
        sweep_interval: float = 60,
        policy: str = "default",
    ) -> None:
        """Create an empty limiter (the sweep starts with `start`).

        Args:
            reactor: The clock: ``seconds()`` for refill, and the sweep's
                timer.
            capacity: Tokens per bucket, i.e. the largest burst.
            window: Seconds to refill an empty bucket completely.
            max_keys: Most buckets kept; beyond it the least recently touched
                is dropped.
            sweep_interval: Seconds between sweeps of full buckets.
            policy: Policy name for the RateLimit header fields.

        Raises:
            ValueError: A non-positive setting or a bad policy name.
        """
        _check_bucket(capacity, window, policy)
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        if not sweep_interval > 0:
            raise ValueError(f"sweep_interval must be positive, got {sweep_interval!r}")
        self._reactor = reactor
        self._capacity = capacity
        self._window = window
        self._interval = window / capacity
        self._max_keys = max_keys
        self._sweep_interval = sweep_interval
        self._policy = policy
        self._epoch = reactor.seconds()
        self._when_full = _full_bucket(capacity, window, policy)
        # key -> time (since _epoch) at which its bucket is full again; in touch order, least
        # recently touched first, so that both the cap and the sweep work
        # from the front.
        self._buckets: OrderedDict[str, float] = OrderedDict()
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor

    backend = "memory"
    state = "ready"
    ready = True
    """In-process buckets decide at once, from the first request."""

    def __len__(self) -> int:
        """Number of buckets currently tracked."""
        return len(self._buckets)

    def consume(self, key: str) -> Decision:
        """Take one token from ``key``'s bucket if it has one.

        Args:
            key: The client identity (verified user or address).

        Returns:
            The decision; a refusal leaves the bucket as it was.
        """
        now = self._reactor.seconds() - self._epoch
        buckets = self._buckets
        full_at = buckets.get(key)
        if full_at is None:
            if len(buckets) >= self._max_keys:
                buckets.popitem(last=False)
            full_at = now
        else:
            # A refused client is still active: touching it keeps the cap
            # from dropping (and so refilling) the keys that hammer hardest.
            buckets.move_to_end(key)
            # As max(): a bucket cannot hold more than capacity, and a wall
            # clock stepping backwards must not take tokens away.
            if full_at < now:
                full_at = now
        if full_at == now:
            # A full bucket: the request is allowed and the answer is always
            # the same (the usual case for a client within its budget).
            buckets[key] = now + self._interval
            return self._when_full
        tokens = self._capacity - (full_at - now) / self._interval
        allowed = tokens >= 1 - GRACE / self._interval
        if allowed:
            tokens -= 1
            full_at += self._interval
        buckets[key] = full_at
        return _decision(allowed, tokens, self._capacity, self._window, self._policy)

    def sweep(self) -> None:
        """Forget buckets that are full again (no decision changes).

        The dict is in touch order, so the sweep pops from the front and stops
        at the first bucket still refilling: O(forgotten), the live buckets
        are never walked. Every bucket untouched for a whole window is full,
        and the stopping bucket was touched within the last window, so each
        sweep forgets at least every bucket idle for a window.
        """
        now = self._reactor.seconds() - self._epoch
        buckets = self._buckets
        forgotten = 0
        while buckets:
            full_at = next(iter(buckets.values()))
            if full_at > now:
                break
            buckets.popitem(last=False)
            forgotten += 1
        if forgotten > len(buckets):
            # A dict never shrinks its table on deletion: after a burst of a
            # million clients the empty slots would stay allocated. Copying
            # the survivors (fewer than were forgotten) gives the memory back.
            self._buckets = OrderedDict(buckets)

    def start(self) -> None:
        """Start sweeping every ``sweep_interval`` seconds."""
        self._sweeper.start(self._sweep_interval, now=False)

    def stop(self) -> None:
        """Stop sweeping (the buckets are kept)."""
        if self._sweeper.running:
            self._sweeper.stop()


# Redis ---------------------------------------------------------------------

BUCKET_SCRIPT = b"""\
-- deltagw token bucket. KEYS[1]: a hash {tokens, us: Redis time of tokens}.
-- ARGV[1]: capacity (tokens). ARGV[2]: window (seconds).
-- Returns {allowed (0/1), tokens left (a string: Lua numbers would be
-- truncated to integers on the way out)}.
local capacity = tonumber(ARGV[1])
local per_us = capacity / (tonumber(ARGV[2]) * 1000000)
-- Redis's own clock, so that gateways whose clocks disagree share one bucket;
-- whole microseconds (exact in a double), so no rounding piles up.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tokens = capacity
local state = redis.call('HMGET', KEYS[1], 'tokens', 'us')
if state[1] then
  tokens = math.min(capacity,
    tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * per_us)
end
-- A microsecond of grace for rounding, as GRACE in Python.
if tokens < 1 - per_us then
  -- Refused: nothing to write, the stored state still refills correctly.
  return {0, string.format('%.17g', tokens)}
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'us', string.format('%d', now))
-- Expire when the bucket would be full: a missing key is a full bucket.
redis.call('PEXPIRE', KEYS[1],
           math.max(1, math.ceil((capacity - tokens) / per_us / 1000)))
return {1, string.format('%.17g', tokens)}
"""
"""The one Lua script that reads and updates a bucket atomically."""

BUCKET_SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT).hexdigest().encode("ascii")

KEY_PREFIX = "deltagw:rl:"
"""Bucket keys are ``deltagw:rl:<policy>:<client key>``."""


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _Incomplete(Exception):
    """The buffer ends in the middle of a reply; wait for more bytes."""


def _parse_reply(buffer: bytes, pos: int) -> tuple[Any, int]:
    """Parse one RESP2 reply starting at ``pos``.

    Returns:
        The reply (bytes, int, None, list, or a `RedisError` instance for an
        error reply) and the position just after it.

    Raises:
        _Incomplete: The reply is not all there yet.
        ValueError: The bytes are not RESP2 (the connection is unusable).
    """
    end = buffer.find(b"\r\n", pos)
    if end == -1:
        raise _Incomplete()
    kind, line, pos = buffer[pos : pos + 1], buffer[pos + 1 : end], end + 2
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buffer) < pos + size + 2:
            raise _Incomplete()
        return buffer[pos : pos + size], pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse_reply(buffer, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP2 reply: {buffer[pos - 2 : end + 2]!r}")


def _command(args: Sequence[bytes]) -> bytes:
    """Encode one command as a RESP2 array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _RespProtocol(Protocol):
    """One pipelined Redis connection: replies come back in command order.

    Attributes:
        pending: Commands sent and not yet answered (including ones whose
            caller gave up: their reply still has to be read to stay in step).
        progress_at: When a reply last arrived, or when a command was sent to
            an idle connection; a connection owing replies with no progress
            for a while is stalled.
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_ready: Callable[[_RespProtocol], None],
        on_lost: Callable[[_RespProtocol], None],
    ) -> None:
        self._clock = clock
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._buffer = b""
        self._waiting: deque[Deferred[Any]] = deque()
        self._lost = False
        self.progress_at = clock.seconds()

    @property
    def pending(self) -> int:
        """Replies still owed by Redis."""
        return len(self._waiting)

    def execute(self, *args: bytes) -> Deferred[Any]:
        """Send one command.

        The Deferred has no canceller on purpose: cancelling it (a timeout)
        fires it with CancelledError at once and the late reply, which must
        still be consumed in order, is then silently dropped.

        Returns:
            A Deferred firing with the reply, or failing with `RedisError`
            (error reply) or ConnectionLost.
        """
        if self._lost:
            return defer.fail(ConnectionLost("Redis connection is closed"))
        if not self._waiting:
            self.progress_at = self._clock.seconds()
        assert self.transport is not None
        self.transport.write(_command(args))
        answer: Deferred[Any] = Deferred()
        self._waiting.append(answer)
        return answer

    def handshake(self, password: str | None, db: int) -> Deferred[None]:
        """Authenticate, select the database and load the bucket script.

        ClientService calls this (``prepareConnection``) on each new
        connection; the limiter uses the connection only once it succeeds.
        Loading the script here keeps EVALSHA hits the norm; the NOSCRIPT
        fallback covers a flushed or failed-over server.
        """
        steps = []
        if password is not None:
            steps.append(self.execute(b"AUTH", password.encode("utf-8")))
        if db:
            steps.append(self.execute(b"SELECT", b"%d" % db))
        steps.append(self.execute(b"SCRIPT", b"LOAD", BUCKET_SCRIPT))
        done = defer.gatherResults(steps, consumeErrors=True)

        def ready(replies: list[Any]) -> None:
            if replies[-1] != BUCKET_SCRIPT_SHA:
                raise RedisError(f"SCRIPT LOAD answered {replies[-1]!r}")
            self._on_ready(self)

        def reject(failure: Failure) -> Failure:
            # ClientService retries a rejected connection with back-off; make
            # sure this one is closed rather than left half-prepared.
            assert self.transport is not None
            self.transport.abortConnection()
            return failure

        return done.addCallback(ready).addErrback(reject)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self.progress_at = self._clock.seconds()
        pos = 0
        while pos < len(self._buffer):
            try:
                reply, pos = _parse_reply(self._buffer, pos)
            except _Incomplete:
                break
            except ValueError:
                self._protocol_error()
                return
            if not self._waiting:
                self._protocol_error()
                return
            answer = self._waiting.popleft()
            if isinstance(reply, RedisError):
                answer.errback(reply)
            else:
                answer.callback(reply)
        self._buffer = self._buffer[pos:]

    def _protocol_error(self) -> None:
        """Drop a connection that sent something we cannot match to a command."""
        self._buffer = b""
        assert self.transport is not None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        # Tell the limiter first: failing the waiting calls runs callers'
        # code synchronously, and their next call must not pick this
        # connection again.
        self._on_lost(self)
        waiting, self._waiting = self._waiting, deque()
        for answer in waiting:
            answer.errback(ConnectionLost(f"Redis connection lost: {reason.getErrorMessage()}"))


class _RespFactory(Factory):
    """Builds `_RespProtocol`s that report readiness and loss to the limiter."""

    def __init__(
        self,
        clock: IReactorTime,
        on_ready: Callable[[_RespProtocol], None],
        on_lost: Callable[[_RespProtocol], None],
    ) -> None:
        self._clock = clock
        self._on_ready = on_ready
        self._on_lost = on_lost

    def buildProtocol(self, addr: Any) -> _RespProtocol:
        return _RespProtocol(self._clock, self._on_ready, self._on_lost)


class RedisLimiter:
    """Token buckets in Redis, one budget shared by every gateway process.

    Each decision is one EVALSHA of `BUCKET_SCRIPT` (EVAL when the server
    answers NOSCRIPT), atomic on the server and timed by Redis's clock, under
    a short per-call timeout. Buckets expire in Redis once full.

    When Redis is down, slow or erroring, ``fail_open`` decides: allow (and
    count in ``failures``), or raise `RedisUnavailable`. Either way one log
    line marks the start of the outage and one its end, never one per request.

    The client is a minimal RESP2 pipeline on a `ClientService` instead of
    txredisapi (which does work with Twisted 26), because txredisapi:
    imports and schedules on the global reactor (reconnection and timers
    cannot run on the reactor we are given, importing it installs the default
    reactor, and a `task.Clock` cannot drive it); and during an outage it
    parks every command until a connection comes back, a list that grows with
    the request rate, where a limiter must fail fast. Here, without a ready
    connection, or with ``max_pending`` replies owed, a call fails at once; a
    connection that owes replies and has been silent for ``stall_after``
    seconds is dropped, and ClientService reconnects with back-off.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        capacity: int,
        window: float,
        policy: str = "default",
        timeout: float = 0.05,
        fail_open: bool = True,
        password: str | None = None,
        db: int = 0,
        max_pending: int = 1000,
        stall_after: float = 1.0,
    ) -> None:
        """Create a limiter; it connects on `start`.

        Args:
            reactor: Clock for timeouts and reconnection back-off.
            endpoint: Where Redis listens (e.g. ``HostnameEndpoint``).
            capacity: Tokens per bucket, i.e. the largest burst.
            window: Seconds to refill an empty bucket completely.
            policy: Policy name, for headers and the key prefix
                ``deltagw:rl:<policy>:``.
            timeout: Seconds one decision may take before Redis counts as
                unavailable; keep it well under a request's latency budget.
            fail_open: Allow requests when Redis cannot decide (True), or
                raise `RedisUnavailable` (False).
            password: Sent with AUTH on each connection, if given.
            db: Database number selected on each connection.
            max_pending: Replies a connection may owe before calls fail fast
                (bounds memory while Redis is slow).
            stall_after: Seconds a connection may owe replies without any
                arriving before it is dropped and re-established; also the
                limit for a new connection's handshake.

        Raises:
            ValueError: A non-positive setting or a bad policy name.
        """
        _check_bucket(capacity, window, policy)
        if not timeout > 0 or not stall_after > 0 or max_pending < 1:
            raise ValueError("timeout, stall_after and max_pending must be positive")
        self._reactor = reactor
        self._capacity = capacity
        self._window = window
        self._policy = policy
        self._timeout = timeout
        self._stall_after = stall_after
        self._max_pending = max_pending
        self._password = password
        self._db = db
        self.fail_open = fail_open
        self._prefix = f"{KEY_PREFIX}{policy}:".encode()
        self._argv = (str(capacity).encode(), repr(float(window)).encode())
        self._protocol: _RespProtocol | None = None
        self._first_attempt_over = False
        self._outage_since: float | None = None
        self._outage_failures = 0
        self.failures = 0
        """Decisions Redis could not make (timeouts, errors, no connection)."""
        self.log = get_logger(component="ratelimit", policy=policy)
        self._service = ClientService(
            endpoint,
            _RespFactory(reactor, self._connection_ready, self._connection_lost),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=5.0, factor=2.0),
            clock=reactor,
            prepareConnection=self._prepare,
        )

    @property
    def connected(self) -> bool:
        """Whether a prepared connection is ready for decisions."""
        return self._protocol is not None

    backend = "redis"

    @property
    def state(self) -> str:
        """``connecting`` until the first connection attempt is over, then
        ``connected`` or ``unavailable``."""
        if not self._first_attempt_over:
            return "connecting"
        return "connected" if self._protocol is not None else "unavailable"

    @property
    def ready(self) -> bool:
        """Whether the limiter decides as configured: connected, or failing
        open once its first attempt is over (its decisions then allow)."""
        state = self.state
        return state == "connected" or (self.fail_open and state == "unavailable")

    def start(self) -> None:
        """Connect, and keep reconnecting whenever the connection is lost."""
        self._service.startService()
        first = self._service.whenConnected(failAfterFailures=1)
        first.addBoth(self._first_attempt_ended)

    def _first_attempt_ended(self, result: Any) -> None:
        """Readiness waits for this: connected, or failed and logged."""
        self._first_attempt_over = True
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.msg(
                "rate_limit_backend_connect_failed",
                reason=f"{result.type.__name__}: {result.getErrorMessage()}",
                fail_open=self.fail_open,
            )

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection.

        Returns:
            A Deferred that fires once the connection is closed.
        """
        stopped: Deferred[None] = self._service.stopService()
        return stopped

    def _prepare(self, protocol: _RespProtocol) -> Deferred[None]:
        return protocol.handshake(self._password, self._db).addTimeout(
            self._stall_after, self._reactor
        )

    def _connection_ready(self, protocol: _RespProtocol) -> None:
        self._protocol = protocol

    def _connection_lost(self, protocol: _RespProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    def consume(self, key: str) -> Deferred[Decision]:
        """Take one token from ``key``'s shared bucket if it has one.

        Args:
            key: The client identity (verified user or address).

        Returns:
            A Deferred firing with the decision. When Redis cannot decide
            within ``timeout``: an allowing decision if ``fail_open``, else a
            failure with `RedisUnavailable`. Cancelling it (the client went
            away) cancels the wait, not the bucket update.
        """
        protocol = self._protocol
        if protocol is None:
            return defer.maybeDeferred(
                self._unavailable, Failure(ConnectionLost("no connection to Redis"))
            )
        if protocol.pending >= self._max_pending:
            return defer.maybeDeferred(
                self._unavailable,
                Failure(RedisError(f"{protocol.pending} replies owed by Redis")),
            )
        bucket = self._prefix + key.encode("utf-8")
        answer = protocol.execute(b"EVALSHA", BUCKET_SCRIPT_SHA, b"1", bucket, *self._argv)
        answer.addErrback(self._eval_if_noscript, protocol, bucket)
        answer.addTimeout(self._timeout, self._reactor)
        answer.addCallback(self._decided)
        answer.addErrback(self._failed, protocol)
        return answer

    def _eval_if_noscript(
        self, failure: Failure, protocol: _RespProtocol, bucket: bytes
    ) -> Deferred[Any] | Failure:
        """Send the script itself when the server has lost it (flush, failover).

        EVAL also caches the script, so the next EVALSHA hits again.
        """
        if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
            return protocol.execute(b"EVAL", BUCKET_SCRIPT, b"1", bucket, *self._argv)
        return failure

    def _decided(self, reply: list[Any]) -> Decision:
        allowed, tokens = reply
        decision = _decision(
            allowed == 1, float(tokens), self._capacity, self._window, self._policy
        )
        if self._outage_since is not None:
            self.log.msg(
                "rate_limit_backend_recovered",
                outage_seconds=round(self._reactor.seconds() - self._outage_since, 3),
                failed_decisions=self._outage_failures,
            )
            self._outage_since = None
        return decision

    def _failed(self, failure: Failure, protocol: _RespProtocol) -> Decision | Failure:
        if failure.check(CancelledError):
            # Our caller cancelled (timeouts arrive as defer.TimeoutError):
            # nobody waits for a decision and Redis is not to blame.
            return failure
        if (
            protocol.pending
            and self._reactor.seconds() - protocol.progress_at >= self._stall_after
        ):
            # Replies are owed and none came for a while: the server is hung
            # or the path to it is black-holed; TCP alone could take many
            # minutes to notice. A fresh connection finds out quickly.
            assert protocol.transport is not None
            protocol.transport.abortConnection()
        return self._unavailable(failure)

    def _unavailable(self, failure: Failure) -> Decision:
        """Count a decision Redis could not make, and apply ``fail_open``.

        Raises:
            RedisUnavailable: ``fail_open`` is False.
        """
        self.failures += 1
        if self._outage_since is None:
            self._outage_since = self._reactor.seconds()
            self._outage_failures = 0
            self.log.msg(
                "rate_limit_backend_unavailable",
                reason=f"{failure.type.__name__}: {failure.getErrorMessage()}",
                fail_open=self.fail_open,
            )
        self._outage_failures += 1
        if not self.fail_open:
            raise RedisUnavailable("rate limiter backend unavailable") from failure.value
        # As if this client's bucket were full: the most generous honest guess.
        return _decision(
            True, self._capacity - 1, self._capacity, self._window, self._policy
        )
