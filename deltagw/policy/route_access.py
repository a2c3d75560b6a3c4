"""Authentication at the edge: which routes need a token, and what each
verification outcome means for the client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.web.iweb import IRequest

from deltagw.errors import AuthServiceUnavailable, Unauthorized
from deltagw.policy.token_verifiers import (
    AuthUnavailable,
    CachingVerifier,
    Identity,
    InvalidToken,
    MissingCredentials,
    parse_bearer,
)
from deltagw.routes import AUTH, Route, part_route

REQUIRED = "required"
OPTIONAL = "optional"
UNUSED = "unused"


def auth_policy(route: Route, require_auth: frozenset[str]) -> str:
    """Whether ``route`` needs a token, takes one if given, or ignores it.

    The auth routes ignore tokens (logout passes its Authorization through
    to the auth service, which judges it); the user routes always need one;
    data and analytics need one when REQUIRE_AUTH lists their group. A
    composed route shows what its parts' rows show, so it needs a
    token whenever one of those rows would (REQUIRE_AUTH=analytics protects
    the overview's put/call ratios too), and otherwise takes one if given.
    """
    if route.group == "user" or route.group in require_auth:
        return REQUIRED
    if route.composed:
        policies = {auth_policy(part_route(part), require_auth) for part in route.parts}
        return REQUIRED if REQUIRED in policies else OPTIONAL
    if route.service is None or route.service is AUTH:
        return UNUSED
    return OPTIONAL


class Authenticator:
    """Turns a request's Authorization header into an identity, or an error.

    Args:
        verifier: Verifies a token (remote or local), through its cache.
        require_auth: Route groups that need a valid token.
    """

    def __init__(self, verifier: CachingVerifier, require_auth: frozenset[str]) -> None:
        self._verifier = verifier
        self._require_auth = require_auth

    def policy(self, route: Route) -> str:
        return auth_policy(route, self._require_auth)

    async def identify(
        self,
        request: IRequest,
        route: Route,
        before_verifying: Callable[[], Awaitable[object]],
    ) -> Identity | None:
        """The verified identity of ``request``, or None where it may go without.

        ``before_verifying`` is awaited before a token is verified that the
        cache cannot answer: each such verification costs the auth service
        a call (or the gateway a signature check), so the caller charges it
        to the client and may refuse it by raising.

        Raises:
            Unauthorized: the route needs a token and none valid was given.
            AuthServiceUnavailable: the route needs a token and the auth
                service could not say whether it is valid.
        """
        policy = self.policy(route)
        if policy == UNUSED:
            return None
        headers = request.requestHeaders.getRawHeaders(b"authorization", [])
        if policy == OPTIONAL and not headers:
            return None
        try:
            if len(headers) > 1:
                raise InvalidToken()
            token = parse_bearer(headers[0] if headers else None)
            if not self._verifier.remembers(token):
                await before_verifying()
            return await self._verifier.verify(token)
        except MissingCredentials:
            raise Unauthorized("Missing Authorization header", token_given=False) from None
        except InvalidToken:
            if policy == OPTIONAL:
                return None
            raise Unauthorized() from None
        except AuthUnavailable as e:
            if policy == OPTIONAL:
                return None
            raise AuthServiceUnavailable(AUTH, e.reason) from None
