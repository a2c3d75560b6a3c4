"""Run the gateway with ``twistd -ny gateway.tac``, configured from the environment.

The same service as ``twistd -n deltagw`` (both call ``deltagw.tap``).
"""

import os

from deltagw.tap import make_application

application = make_application(os.environ)
