"""The one place deltagw leans on Twisted's private names.

Everything else in deltagw uses Twisted's public API only. Each module here
makes the gateway faster (or its timing tighter) by relying on an internal
of a Twisted release that has been tested; each is turned on by the SPEEDUPS
setting (default on), and with ``SPEEDUPS=0`` the gateway runs on stock,
public Twisted alone. Each module has a test in ``tests/integration/test_speedups_shape.py``
that fails loudly when the internal it relies on changes shape, so a Twisted
upgrade breaks a test, not production.
"""
