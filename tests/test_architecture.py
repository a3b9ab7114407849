"""The layering of the package: numerics at the bottom, the application layer and CLI on top."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "meanfield_tf"


def test_import_leaves_application_dependencies_out():
    """`import meanfield_tf` loads the numerics only: no YAML, matplotlib, tqdm or scikit-learn."""
    code = ("import sys, meanfield_tf; "
            "print(','.join(m for m in ('yaml', 'matplotlib', 'tqdm', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def _lazy_nodes(tree) -> set[int]:
    """The ids of the nodes inside a module-level `__getattr__` (imports on first use)."""
    return {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}


def _imports(path: Path, *, lazy: bool = True) -> set[str]:
    """Every module a file imports, relative imports resolved against the package (with
    `lazy=False`, not those inside a module-level `__getattr__`)."""
    tree = ast.parse(path.read_text())
    skip = set() if lazy else _lazy_nodes(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                names.add(".".join(base + ((node.module,) if node.module else ())))
            else:
                names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_numerics_never_import_the_application_layer():
    numerics = [p for p in PACKAGE.glob("_*.py") if p.name != "__main__.py"]
    assert len(numerics) > 15
    for path in numerics:
        # the package's `__getattr__` may hand out `load_run` from the application layer on
        # first use (the import-laziness test above keeps `import meanfield_tf` free of it)
        bad = {m for m in _imports(path, lazy=path.name != "__init__.py")
               if m.startswith(("meanfield_tf.workflow", "meanfield_tf.cli", "yaml", "matplotlib",
                                "tqdm"))}
        assert not bad, (path.name, bad)


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_cli_modules_only_parse_and_print():
    """The command-line modules hold no configuration schema or object building of their own:
    they import their work from `meanfield_tf.workflow`."""
    for path in (PACKAGE / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                   and not all(ast.unparse(b).startswith("argparse.") for b in n.bases)]
        assert not classes, (path.name, classes)  # argparse specialisations are parsing
