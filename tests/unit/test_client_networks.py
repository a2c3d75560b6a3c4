"""Which clients may use the operator routes: METRICS_ALLOW and ADMIN_ALLOW."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from deltagw.config import ConfigError, load_settings
from deltagw.policy.client_networks import client_allowed


def _allow(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """METRICS_ALLOW as the gateway reads it."""
    return load_settings({"METRICS_ALLOW": text}).metrics_allow


class ClientAllowedTests(SynchronousTestCase):
    def test_empty_allows_everyone(self) -> None:
        """An empty list (METRICS_ALLOW's default): every client, even a non-IP peer."""
        self.assertTrue(client_allowed("203.0.113.9", ()))
        self.assertTrue(client_allowed("-", ()))

    def test_cidrs(self) -> None:
        """Only addresses inside a listed network may read."""
        allow = _allow("10.0.0.0/8, 127.0.0.1 ,::1")
        self.assertEqual(len(allow), 3)
        self.assertTrue(client_allowed("10.1.2.3", allow))
        self.assertTrue(client_allowed("127.0.0.1", allow))
        self.assertTrue(client_allowed("::1", allow))
        self.assertFalse(client_allowed("127.0.0.2", allow))
        self.assertFalse(client_allowed("192.168.1.1", allow))
        self.assertFalse(client_allowed("2001:db8::1", allow))

    def test_ipv4_mapped_ipv6(self) -> None:
        """A v4 client seen on a dual-stack socket (::ffff:a.b.c.d) matches v4 networks."""
        allow = (ipaddress.ip_network("10.0.0.0/8"),)
        self.assertTrue(client_allowed("::ffff:10.0.0.5", allow))

    def test_non_ip_is_refused_when_restricted(self) -> None:
        """A peer that is not an IP (UNIX socket, "-") is refused once a list is set."""
        allow = _allow("127.0.0.0/8")
        self.assertFalse(client_allowed("-", allow))
        self.assertFalse(client_allowed("", allow))

    def test_metrics_allow_rejects_garbage(self) -> None:
        """An empty list allows everyone; a bad entry is a start-up error naming the setting."""
        self.assertEqual(_allow(""), ())
        self.assertEqual(_allow(" , "), ())
        with self.assertRaises(ConfigError) as raised:
            _allow("10.0.0.0/8,not-a-network")
        self.assertIn("METRICS_ALLOW", str(raised.exception))


    def test_admin_allow_is_loopback_unless_set(self) -> None:
        """ADMIN_ALLOW (who may purge the cache) defaults to the host itself, not everyone."""
        allow = load_settings({}).admin_allow
        self.assertTrue(client_allowed("127.0.0.1", allow))
        self.assertTrue(client_allowed("::1", allow))
        self.assertFalse(client_allowed("10.1.2.3", allow))
        self.assertFalse(client_allowed("-", allow))
        self.assertEqual(load_settings({"ADMIN_ALLOW": "10.0.0.0/8"}).admin_allow,
                         (ipaddress.ip_network("10.0.0.0/8"),))
