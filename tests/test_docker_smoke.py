"""The Docker smoke check's entry points, without a container engine.

`scripts/docker_smoke.sh` builds the image and compares its default run with the host's; CI runs
it after the test suite (`.ci/run`), not from pytest, because it installs system packages and
starts a daemon as root. Here: it parses, documents itself, rejects bad arguments, and skips with
a reason, not a failure, where no engine can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docker_smoke.sh"


def test_smoke_script_is_valid_bash_with_usage_and_argument_errors():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--cuda" in usage.stdout and "--network none" in usage.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr


def test_ci_runs_the_readme_test_command_then_the_slow_tests_and_the_smoke_script():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    work = lines[lines.index('cd "$(dirname "$0")/.."') + 1:]
    readme = (ROOT / "README.md").read_text().splitlines()
    step = next(i for i, line in enumerate(readme) if line.startswith("# 2. install and run the tests"))
    assert work[0] == readme[step + 1].strip()
    assert work[0].startswith("pip install -e '.[test]' && python -m pytest")
    assert work[1] == "python -m pytest -q -m slow"  # the slow tests still run in CI, apart
    assert any("scripts/docker_smoke.sh" in line for line in work[2:])


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the script as an unprivileged user")
def test_smoke_script_skips_without_an_engine_for_an_unprivileged_user():
    # a copy the unprivileged user can read (the checkout may lie under a private home)
    copy = Path(tempfile.mkdtemp())
    try:
        copy.chmod(0o755)
        script = copy / "docker_smoke.sh"
        shutil.copy(SCRIPT, script)
        script.chmod(0o755)
        env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "TMPDIR": "/tmp",
               "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "bash", str(script)], capture_output=True, text=True, env=env,
                             cwd=copy, timeout=60)
    finally:
        shutil.rmtree(copy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("docker_smoke: SKIP: ") and "root" in out.stdout
