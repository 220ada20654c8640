"""The Ray that `make run` starts (the stack fixture starts it the same way) runs with what `raystack start`
exports: here, Serve's controller passes at raystack's pace, as `serve controller-health` reports it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from raystack.process import SERVE_CONTROLLER_ENV
from tests.e2e.conftest import gcs_address


def test_serves_controller_passes_every_half_second(stack):
    # serve run's local cluster requires Ray's token, which a driver given an address sends only in token mode.
    env = os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    out = subprocess.run([str(Path(sys.executable).with_name("serve")), "controller-health", "--address",
                          gcs_address(stack), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    health = json.loads(out.stdout)
    interval = float(SERVE_CONTROLLER_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"])
    assert health["expected_sleep_duration_s"] == interval == 0.5
    assert health["loops_per_second"] < 1 / interval + 0.1  # Ray's default passes 10 times a second
