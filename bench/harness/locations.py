"""Where the benchmark's files and tools are, and the one address everything listens on."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import NamedTuple

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"


class Tools(NamedTuple):
    """The programs a run needs; None when not found."""

    wrk: str | None
    nginx: str | None
    twistd: str | None

    def missing(self) -> list[str]:
        """The names of the tools not found, to say so before starting anything."""
        return [name for name, path in self._asdict().items() if not path]


def find_tools() -> Tools:
    """wrk and nginx on PATH (Debian's nginx is in /usr/sbin), twistd next to our Python."""
    debian_nginx = Path("/usr/sbin/nginx")
    nginx = shutil.which("nginx") or (str(debian_nginx) if debian_nginx.exists() else None)
    twistd = next((str(p) for p in (Path(sys.executable).parent / "twistd",
                                     REPO_DIR / ".venv" / "bin" / "twistd") if p.exists()), None)
    return Tools(wrk=shutil.which("wrk"), nginx=nginx, twistd=twistd)


def venv_python(twistd: str) -> str:
    """The Python of the venv that holds ``twistd``: it has the installed deltagw."""
    return str(Path(twistd).parent / "python")
