"""Which clients may use the gateway's operator routes (METRICS_ALLOW, ADMIN_ALLOW)."""

from __future__ import annotations

import ipaddress

from deltagw.config import Network


def client_allowed(client_address: str, allow: tuple[Network, ...]) -> bool:
    """Whether ``client_address`` is inside one of the ``allow`` networks.

    Args:
        client_address: The client as the gateway believes it
            (``request.client_address``: the peer, or the X-Forwarded-For
            entry a trusted proxy vouches for).
        allow: Networks from the setting; empty allows everyone.

    Returns:
        True when ``allow`` is empty or holds the address. An address that
        is not an IP (a UNIX socket peer, ``-``) is refused when a list is set.
    """
    if not allow:
        return True
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)
