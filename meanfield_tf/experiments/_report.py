"""`meanfield-tf experiment report`: one Markdown page from experiment run directories.

For every run (in registry order): the claim, the command that made it (from the manifest), when
and on what machine, the figures (PNGs copied beside the page), the table from `rows`, and the
`discussion` paragraph. Every number on the page comes from a `results.json`; nothing is typed by
hand, so the page cannot drift from the runs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from .._errors import InputError
from . import NAMES, get
from ._runner import CONFIG, MANIFEST, RESULTS, format_table, is_run_dir

MAX_FIGURE_BYTES = 1_000_000  # larger PNGs are linked from the run directory, not copied


def expand_run_dirs(paths: list[Path | str]) -> list[Path]:
    """Run directories from `paths`: each is a run directory, or a directory whose
    subdirectories are (as `run all` writes). Sorted in registry order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise InputError(f"run directory {str(p)!r} does not exist; give the --out of an "
                             f"`experiment run`")
        if is_run_dir(p):
            found.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if q.is_dir() and is_run_dir(q))
        if not subs:
            raise InputError(f"{str(p)!r} is not an experiment run directory (no {MANIFEST}) "
                             f"and holds none; give the --out of an `experiment run`")
        found.extend(subs)

    def order(p: Path) -> int:
        name = json.loads((p / MANIFEST).read_text())["experiment"]
        return NAMES.index(name) if name in NAMES else len(NAMES)

    return sorted(found, key=order)


def _load(run: Path) -> tuple[dict, dict, dict]:
    import yaml

    for fname in (MANIFEST, RESULTS, CONFIG):
        if not (run / fname).is_file():
            raise InputError(f"run directory {str(run)!r} has no {fname} (did the run finish?); "
                             f"re-run it or leave it out of the report")
    manifest = json.loads((run / MANIFEST).read_text())
    results = json.loads((run / RESULTS).read_text())
    config = yaml.safe_load((run / CONFIG).read_text())
    return manifest, results, config


def _size(man: dict) -> str:
    """`quick`, `full`, or `full, with overrides` (a `key=value` on the run's command line)."""
    if man.get("quick"):
        return "quick"
    overrides = [a for a in str(man.get("command", "")).split()[4:] if "=" in a]
    return f"full, with {' '.join(overrides)}" if overrides else "full"


def _machine_line(manifest: dict) -> str:
    m = manifest.get("machine", {})
    devices = m.get("devices") or []
    dev = devices[0] if devices else m.get("backend", "?")
    extra = f" ({len(devices)} devices)" if len(devices) > 1 else ""
    return (f"{m.get('cpu_count', '?')}-core {m.get('processor', '')} CPU machine, "
            f"{m.get('platform', '?')}, JAX backend {m.get('backend', '?')}: {dev}{extra}")


def write_report(run_dirs: list[Path | str], out: Path | str = "docs/results.md",
                 figures: Path | str = "docs/figures") -> Path:
    """Write the Markdown page `out` from `run_dirs`, copying figures into `figures`."""
    runs = expand_run_dirs(run_dirs)
    out = Path(out)
    figures = Path(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    loaded = [(run, *_load(run)) for run in runs]

    today = datetime.date.today().isoformat()
    lines = [
        "# Results: the paper's claims, reproduced",
        "",
        f"Generated on {today} by `meanfield-tf experiment report` from {len(loaded)} run "
        "directories (one per experiment below); every number is read from a run's "
        "`results.json`, every figure is the run's own PNG. Each section gives the command that "
        "reproduces its run.",
        "",
        "| experiment | claim | run on | date | wall time | size |",
        "|---|---|---|---|---|---|",
    ]
    for run, man, res, cfg in loaded:
        wall = man.get("wall_seconds")
        wall_s = f"{wall:.0f} s" if isinstance(wall, (int, float)) else "?"
        lines.append(f"| [{man['experiment']}](#{man['experiment']}) | {man.get('claim', '')} | "
                     f"{_machine_line(man)} | {str(man.get('started', '?'))[:10]} | {wall_s} | "
                     f"{_size(man)} |")
    lines.append("")

    for run, man, res, cfg in loaded:
        name = man["experiment"]
        lines += [f"## {name}", "", f"**Claim.** {man.get('claim', '')}", "",
                  f"**Command.** `{man.get('command', '?')}` — run {man.get('started', '?')} on a "
                  f"{_machine_line(man)}, wall time "
                  f"{man.get('wall_seconds', '?')} s, git commit `{man.get('git_commit')}`.", ""]
        try:
            module = get(name)
        except Exception as err:  # the page still lists the run, without table/discussion
            module = None
            lines += [f"_(experiment module unavailable: {err})_", ""]
        for png in sorted((run / "figures").glob("*.png")) if (run / "figures").is_dir() else []:
            size = png.stat().st_size
            if size > MAX_FIGURE_BYTES:  # keep the docs small: say so instead of copying
                lines += [f"_(figure {png.name} not copied: {size} bytes > "
                          f"{MAX_FIGURE_BYTES}; see the run directory)_", ""]
                continue
            target = figures / f"{name}-{png.name}"
            shutil.copyfile(png, target)
            rel = os.path.relpath(target, out.parent)
            lines += [f"![{name}: {png.stem}]({Path(rel).as_posix()})", ""]
        if module is not None:
            lines += [format_table(module.rows(res), fmt="markdown"), "",
                      module.discussion(res), ""]
        settings = ", ".join(f"{k}={v}" for k, v in cfg.items())
        lines += [f"<sub>Resolved config: {settings}</sub>", ""]
    out.write_text("\n".join(lines))
    return out
