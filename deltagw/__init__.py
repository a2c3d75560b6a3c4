"""deltagw: the API gateway of the DeltaStream platform."""

__version__ = "0.1.0"
