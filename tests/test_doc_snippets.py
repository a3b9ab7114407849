"""Every fenced ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh Python process (cumulatively: a later block may
use what an earlier one defined, as a reader going down the page would), with a temporary
working directory. A block whose first line is `# illustration only` is skipped: none is, today.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "# illustration only"


def python_blocks(path: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown file, in order, minus illustrations."""
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)
    return [b for b in blocks if not b.lstrip().startswith(SKIP)]


def test_the_extractor_finds_blocks():
    assert len(python_blocks(ROOT / "README.md")) >= 2
    assert sum(len(python_blocks(f)) for f in FILES) >= 6


@pytest.mark.parametrize("path", [f for f in FILES if python_blocks(f)],
                         ids=lambda p: p.name)
def test_snippets_run(path, tmp_path):
    blocks = python_blocks(path)
    script = "\n".join(f"# --- block {i} of {path.name}\n{b}" for i, b in enumerate(blocks))
    (tmp_path / "snippets.py").write_text(script)
    # this checkout's package, whatever copy is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "snippets.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, f"{path.name}:\n{out.stderr[-3000:]}"
