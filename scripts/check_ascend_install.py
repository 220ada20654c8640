#!/usr/bin/env python3
"""`make check-ascend`: prove that what each kind of Ascend cluster node installs resolves, without an NPU.

For each node kind and each of linux x86_64 and aarch64, pip's own resolver resolves raystack's dependencies
(pyproject.toml) with that kind's constraints (install/) against the package registry, for the cluster's
Python (3.12) and the images' glibc (Ubuntu 22.04's 2.35), as a dry run: nothing is installed. It fails on
any conflict, and checks that the resolution keeps the pins that matter (one Ray everywhere; the
vllm-ascend image's torch stack untouched; a fastapi both Ray and vLLM take).

    head / MindIE node   raystack alone in a Python 3.12 (the head runs routers; a MindIE node runs raystack in
                         a Python of its own, beside MindIE's, whose daemon keeps MindIE's environment)
    vLLM-Ascend node     raystack in vllm-ascend's image's Python, beside what the image holds
                         (install/vllm-ascend-image.txt)

A control also resolves the vLLM-Ascend set with vllm-ascend's own declared fastapi<0.124.0 and expects pip
to refuse it (the conflict install/vllm-ascend-node.txt overrides): proof that the check sees conflicts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
except ImportError:  # a bare Python: pip, which this check drives anyway, carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install"
PYTHON = "3.12"  # the cluster's Python minor: vllm-ascend's image (install/cluster.txt)
GLIBC_MAX = 35  # Ubuntu 22.04, the base of vllm-ascend's and MindIE's images
ARCHES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class NodeSet:
    name: str
    requirements: tuple[str, ...]  # files of install/ besides raystack's own dependencies
    constraints: str
    keeps: dict[str, str] = field(default_factory=dict)  # package -> version specifier the result must meet
    extra: tuple[str, ...] = ()  # further requirements (the control's conflicting pin)
    expect_conflict: bool = False
    arches: tuple[str, ...] = ARCHES


# On x86_64 torch-npu 2.10.0.post4 requires torch==2.10.0+cpu, which only PyTorch's CPU index serves (the
# image installs from it: its Dockerfile's --extra-index https://download.pytorch.org/whl/cpu/); the registry's
# torch 2.10.0 stands in for it, and torch-npu's own requirements are checked against the result instead.
CHECKED_APART = {"x86_64": ("torch-npu",)}


SETS = (
    NodeSet("head / MindIE node", (), "cluster.txt", {"ray": "==2.60.0", "fastapi": ">=0.133.0,<0.137"}),
    NodeSet("vLLM-Ascend node", ("vllm-ascend-image.txt",), "vllm-ascend-node.txt",
            {"ray": "==2.60.0", "torch": "==2.10.0", "torch-npu": "==2.10.0.post4", "transformers": "==5.5.4",
             "fastapi": ">=0.133.0,<0.137"}),
    NodeSet("control: vllm-ascend's own fastapi pin", ("vllm-ascend-image.txt",), "cluster.txt",
            extra=("fastapi<0.124.0",), expect_conflict=True, arches=("aarch64",)),
)


def raystack_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def target(arch: str) -> list[str]:
    """pip's options for a cp312 Linux `arch` of glibc up to GLIBC_MAX, wheels only (pip's rule for a foreign
    target). pip takes each manylinux tag literally (it does not widen manylinux_2_35 to older glibc): all listed."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MAX, 16, -1)]
    tags += [f"manylinux2014_{arch}", f"linux_{arch}"]
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON,
            *[arg for tag in tags for arg in ("--platform", tag)]]


def resolve(node: NodeSet, arch: str, index_url: str) -> tuple[bool, str, dict[str, str]]:
    """(resolved, pip's last words, package -> version) for one node kind on one architecture."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--isolated",
                   "--index-url", index_url, "--target", str(Path(tmp) / "target"), "--report", str(report),
                   *target(arch), "-c", str(INSTALL / node.constraints), *raystack_requirements(), *node.extra]
        apart = CHECKED_APART.get(arch, ())
        for i, name in enumerate(node.requirements):
            kept = [line for line in (INSTALL / name).read_text().splitlines() if _name(line) not in apart]
            (Path(tmp) / f"{i}.txt").write_text("\n".join(kept))
            command += ["-r", str(Path(tmp) / f"{i}.txt")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        words = " ".join(line.strip() for line in (done.stderr or done.stdout).splitlines()
                         if "ERROR" in line or "conflict" in line.lower())[-600:]
        if done.returncode != 0:
            return False, words or done.stderr[-600:], {}
        installed = json.loads(report.read_text())["install"]
        return True, "", {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installed}


def _name(line: str) -> str | None:
    line = line.split("#")[0].strip()  # options (-c, -r) name no package
    return canonicalize_name(Requirement(line).name) if line and not line.startswith("-") else None


def unmet_requirements(package: str, arch: str, resolved: dict[str, str], index_url: str) -> list[str]:
    """The requirements of `package`'s wheel (as pinned in vllm-ascend-node.txt) for `arch` that the resolved
    set does not meet, comparing public versions (the image's torch is 2.10.0+cpu)."""
    pin = next(line for line in (INSTALL / "vllm-ascend-node.txt").read_text().splitlines() if _name(line) == package)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--isolated", "--no-deps",
                        "--index-url", index_url, *target(arch), "-d", tmp, pin],
                       check=True, capture_output=True, timeout=600)
        [wheel] = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
    unmet = []
    for text in requires:
        req = Requirement(text)
        have = resolved.get(canonicalize_name(req.name))
        wanted = SpecifierSet(",".join(str(s).split("+")[0] for s in req.specifier))
        if have is None or have.split("+")[0] not in wanted:
            unmet.append(f"{package} requires {text}, resolved {have or 'nothing'}")
    return unmet


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-url", default="https://pypi.org/simple", help="the package registry to resolve against")
    args = parser.parse_args()

    jobs = [(node, arch) for node in SETS for arch in node.arches]
    with ThreadPoolExecutor(max_workers=3) as pool:  # network-bound: pip mostly waits on the registry
        results = list(pool.map(lambda job: resolve(*job, args.index_url), jobs))

    failed = False
    print(f"{'node kind':42} {'arch':8} {'result':10} ray      fastapi   starlette torch")
    for (node, arch), (ok, words, versions) in zip(jobs, results):
        if node.expect_conflict:
            verdict = "conflict, as expected" if not ok else "RESOLVED (vllm-ascend's pin no longer conflicts)"
            print(f"{node.name:42} {arch:8} {verdict}")
            continue
        wrong = [f"{name} {versions.get(name, 'absent')} (wants {spec})" for name, spec in node.keeps.items()
                 if name not in CHECKED_APART.get(arch, ())
                 and (versions.get(name) is None or versions[name] not in SpecifierSet(spec))]
        if ok and node.requirements:
            wrong += [problem for package in CHECKED_APART.get(arch, ())
                      for problem in unmet_requirements(package, arch, versions, args.index_url)]
        if not ok or wrong:
            failed = True
            print(f"{node.name:42} {arch:8} FAILED     {words or '; '.join(wrong)}")
            continue
        print(f"{node.name:42} {arch:8} {'ok':10} " + " ".join(
            f"{versions.get(name, '-'):9}" for name in ("ray", "fastapi", "starlette", "torch")))
    if failed:
        print("\nA node kind does not resolve: fix install/*.txt or pyproject.toml (see the lines above).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
