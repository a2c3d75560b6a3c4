"""twistd plugin: ``twistd -n deltagw``. Imports nothing heavy: twistd imports every plugin module to list them."""

from twisted.application.service import ServiceMaker

deltagw = ServiceMaker(
    "deltagw",
    "deltagw.tap",
    "DeltaStream API gateway: auth, rate limits and routing to the backends.",
    "deltagw",
)
