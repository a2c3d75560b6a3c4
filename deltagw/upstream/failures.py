"""What an upstream call's failure was: named for logs and metrics, retryable or not, ours or not.

One home for reading Twisted's failures, for both clients the gateway uses:
the forward client (`deltagw.upstream.client`) and twisted.web's client,
through treq, for the gateway's own JSON calls and the remote token verifier.
"""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from deltagw.upstream.client import InvalidResponse, NoResponse, ResponseBroken

_CONNECTION_FAILURES = (
    NoResponse, ResponseBroken, ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed
)
"""Failures that carry their causes in ``reasons``: the forward client's, and
the public ones of twisted.web's client (the JSON calls, through treq)."""


def failure_reason(failure: Failure) -> str:
    """A short name for why an upstream call failed, for logs and metrics."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timeout"
    if failure.check(InvalidResponse):
        return "invalid_response"
    if failure.check(error.ConnectionRefusedError):
        return "refused"
    if failure.check(error.DNSLookupError, error.NoRouteError, error.ConnectError):
        return "unreachable"
    if failure.check(SSL.Error, VerificationError):
        return "tls"
    if failure.check(*_CONNECTION_FAILURES):
        reasons = failure.value.reasons
        if any(r.check(SSL.Error, VerificationError) for r in reasons):
            return "tls"
        if failure.check(ResponseFailed) and not all(
            r.check(error.ConnectionLost, error.ConnectionDone) for r in reasons
        ):
            # twisted.web's client fails an answer it cannot parse this way.
            return "invalid_response"
        return "reset"
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        return "reset"
    return "error"


def was_cancelled(failure: Failure) -> bool:
    """Tell whether a call failed because we cancelled it (not a timeout)."""
    if failure.check(defer.TimeoutError):
        return False
    if failure.check(defer.CancelledError, error.ConnectingCancelledError):
        return True
    return bool(
        failure.check(*_CONNECTION_FAILURES)
        and any(r.check(defer.CancelledError) for r in failure.value.reasons)
    )


def _is_lost_connection(reason: Failure) -> bool:
    """Tell whether a transport ``connectionLost`` reason was the peer's doing.

    `ConnectionAborted` is a `ConnectionLost` subclass, but it means *we*
    aborted (a timeout or a cancellation closing the socket), which must not
    be retried.
    """
    return bool(
        reason.check(ConnectionLost, ConnectionDone)
        and not reason.check(ConnectionAborted)
    )


def is_connection_failure(failure: Failure) -> bool:
    """Tell whether a call failed on the connection before any response byte.

    Checked against the forward client's `NoResponse` and the public
    failure types of twisted.web's HTTP/1.1 client (``twisted.web.client``):

    - `ConnectionRefusedError`: the connect was refused; nothing was sent.
    - `RequestNotSent`: the pooled connection was no longer usable; nothing
      was sent.
    - `RequestTransmissionFailed`: the connection was lost while the request
      was being written; its ``reasons`` hold the transport's reason.
    - `NoResponse` / `ResponseNeverReceived`: the request was sent but the
      connection ended before any response byte (the parsers fail otherwise
      once a byte has arrived). Cancelling a request of twisted.web's client
      also raises it, with a `CancelledError` reason, and its abort with
      another ``ConnectionAborted``; so the wrappers count only when every
      reason is a connection closed or reset by the peer.
    - bare `ConnectionLost` / `ConnectionDone`, for the same peer-side loss
      surfacing unwrapped.

    Anything else is not: timeouts (``defer.TimeoutError``,
    ``error.TimeoutError``, ``TCPTimedOutError``, ``ConnectingCancelledError``),
    `CancelledError`, ``RequestGenerationFailed`` (which is what a cancel
    while sending raises), DNS and TLS errors, `InvalidResponse`, `ResponseBroken` and `ResponseFailed`.

    Args:
        failure: The failure of one attempt.

    Returns:
        True when the request can be sent again without risking a double
        effect or a half-relayed response.
    """
    if failure.check(ConnectionAborted):
        return False
    if failure.check(error.ConnectionRefusedError, RequestNotSent, ConnectionLost, ConnectionDone):
        return True
    if isinstance(failure.value, (RequestTransmissionFailed, ResponseNeverReceived, NoResponse)):
        reasons: list[Failure] = failure.value.reasons
        return bool(reasons) and all(_is_lost_connection(r) for r in reasons)
    return False
