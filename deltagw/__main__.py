"""``python -m deltagw`` (and the ``deltagw`` command): twistd's deltagw, in the foreground.

``deltagw --demo`` is ``twistd --nodaemon --pidfile= deltagw --demo``;
``deltagw --version`` prints deltagw's version.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the gateway in the foreground with ``argv`` as its options."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments in (["--version"], ["-V"]):
        from deltagw.tap import version_line

        print(version_line())
        return
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "deltagw", *arguments]
    run()


if __name__ == "__main__":
    main()
