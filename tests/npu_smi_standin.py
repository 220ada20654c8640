"""A stand-in `npu-smi` executable for tests: it answers from published npu-smi outputs
(tests/fixtures/npu-smi, see tests/fixtures/README.md) so discovery is tested at its real boundary, a
process on PATH."""

import json
import stat
import sys
from pathlib import Path

from tests import FIXTURES


def fixture(name: str) -> str:
    return (FIXTURES / "npu-smi" / name).read_text()


# The stand-in answers `npu-smi <args>` from a JSON table keyed by the normalised command: "info",
# "info -m", "info -t usages -i 0 -c 0" (npu-smi takes its options in any order). An answer is the text
# to print, or {"stdout", "rc", "sleep"}. Unknown commands fail the way npu-smi does for a bad card id.
# Every call is appended to npu-smi.calls so tests can see what discovery asked.
STAND_IN = r'''#!{python} -IS
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "npu-smi.calls"), "a") as f:
    f.write(" ".join(args) + "\n")
opts = dict(zip(args[1::2], args[2::2])) if len(args) > 2 else {{}}
key = " ".join(args) if len(args) <= 2 else "info " + " ".join(
    f"{{o}} {{opts[o]}}" for o in ("-t", "-i", "-c") if o in opts)
with open(os.path.join(here, "npu-smi.json")) as f:
    answer = json.load(f).get(key)
if answer is None:
    print("Invalid card id.\nError parameter of -i")
    sys.exit(255)
if isinstance(answer, str):
    answer = {{"stdout": answer}}
time.sleep(answer.get("sleep", 0))
sys.stdout.write(answer.get("stdout", ""))
sys.exit(answer.get("rc", 0))
'''


class StandIn:
    def __init__(self, directory: Path, answers: dict):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "npu-smi"
        self.path.write_text(STAND_IN.format(python=sys.executable))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)
        (directory / "npu-smi.json").write_text(json.dumps(answers))
        self._calls = directory / "npu-smi.calls"

    def calls(self) -> list[str]:
        return self._calls.read_text().splitlines() if self._calls.exists() else []


