"""twistd plugin: ``twistd -n deltagw``. Imports nothing heavy (see STYLE)."""

from twisted.application.service import ServiceMaker

deltagw = ServiceMaker(
    "deltagw",
    "deltagw.tap",
    "DeltaStream API gateway: auth, rate limits and routing to the backends.",
    "deltagw",
)
