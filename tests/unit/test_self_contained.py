"""The repository stands alone: users clone it without anything beside it, so no file may name a
checkout-relative path outside it (as the tests once read ../shared/fixtures). `.ci/run` proves the
same by running the suite in a clone with nothing beside it; this names the offending line at once."""

import re
import subprocess

from tests import FIXTURES

ROOT = FIXTURES.parents[1]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|/work/main|parents\[[3-9]\]")


def test_no_tracked_file_names_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offending = []
    for name in files:
        if name == "tests/unit/test_self_contained.py":
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        offending += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                      if OUTSIDE.search(line)]
    assert not offending, "paths outside the repository:\n" + "\n".join(offending)

