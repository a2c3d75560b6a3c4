"""Reference backends for the DeltaStream platform: auth, storage, analytics.

They speak the contract the gateway relies on (README's route table) so that
``twistd -n deltagw --demo`` gives a complete platform on one machine, and so
that the gateway's integration tests have real upstreams to talk to.
:class:`deltagw.demo.platform.DemoPlatform` runs all three on loopback.
"""
