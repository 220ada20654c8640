"""Whether this node runs MindIE, as `raystack start` tells it: the daemon where a replica would start it
(settings.MindIESettings.install: $MIES_INSTALL_PATH, else the Ascend home's
mindie/latest/mindie-service) and MindIE's version from its version.info. The daemon is never run to ask:
it has no --version and exits -1 on an argument it does not know (MindIE-LLM
src/server/daemon/llm_daemon.cpp).

version.info, as MindIE's installer writes it to <Ascend home>/mindie/latest/version.info (MindIE-LLM
docs/en/user_guide/install/source/installation_on_a_physical_machine.md, step 8), one `key : value` per
line, split at the first ':':
    MindIE 2.x    Ascend-mindie : MindIE 2.1.RC2.B080   (then mindie-rt, mindie-service, mindie-llm: 2.1.RC2.B080)
    MindIE 3.0    mindie: 3.0.0                          (the open-source packaging: scripts/build_mindie/package.sh)
Older tooling reads mindie/latest/mindie-service/version.info instead; it is the fallback.
"""

from __future__ import annotations

import re
from pathlib import Path

from raystack.engines.base import Found, Where, version_series

VERSION_KEYS = ("ascend-mindie", "mindie", "mindie-service", "ascend-mindie-service", "version")
_VERSION = re.compile(r"\d+\.\d+[\w.+-]*")


def read_version(text: str) -> str | None:
    """MindIE's version from a version.info: "2.1.RC2.B080", "3.0.0"; None if no known line holds one."""
    lines = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            lines.setdefault(key.strip().lower(), value.strip())
    for key in VERSION_KEYS:
        match = _VERSION.search(lines.get(key, ""))
        if match:
            return match[0]
    return None


def version_files(home: Path, install: Path) -> list[Path]:
    files = [home / "mindie/latest/version.info", install.parent / "version.info", install / "version.info"]
    return list(dict.fromkeys(files))


def detect(where: Where) -> Found:
    from raystack.engines.mindie.settings import DAEMON, MindIESettings

    install = MindIESettings(ascend_home=str(where.ascend_home)).install(dict(where.environ))
    daemon = install / DAEMON
    if not daemon.is_file():
        return Found(note=f"{daemon} is missing")
    files = version_files(where.ascend_home, install)
    for path in files:
        try:
            version = read_version(path.read_text(errors="replace"))
        except OSError:
            continue
        if version:
            return Found(f"MindIE {version} ({daemon})", version_series(version))
    return Found(f"MindIE of unknown version ({daemon})",
                 note=f"{daemon} is there, but no version.info says which MindIE it is ({', '.join(map(str, files))}); "
                      f"reinstall MindIE (its installer writes version.info), or point --ascend-home at its Ascend home")
