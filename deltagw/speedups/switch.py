"""A service that turns a speedup on for as long as it runs."""

from __future__ import annotations

from twisted.application.service import Service


class Switch(Service):
    """Each subclass is one speedup, on while any of its services runs.

    Counted rather than a flag: tests run several gateways in one process,
    and one of them stopping must not turn the speedup off under the others.
    """

    running_count = 0
    """How many services of this subclass run (read by the speedup's hot path)."""

    def startService(self) -> None:
        if not self.running:  # a service may be started or stopped twice
            type(self).running_count += 1
        super().startService()

    def stopService(self) -> None:
        if self.running:
            type(self).running_count -= 1
        super().stopService()
