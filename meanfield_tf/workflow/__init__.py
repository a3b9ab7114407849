"""The application layer: from YAML configs and command-line words to runs on disk.

The numerics (`meanfield_tf`'s private modules) never import this package. Inside it, one idea
per module, from the bottom up:

- `config/`: every configuration schema (strict frozen dataclasses, YAML, dotted overrides);
- `build.py`: the one place where names become library objects, and a config becomes a `Run`;
- `files.py`: the `.npz` formats of the command line, and atomic writes;
- `rundir.py`: the run directory (config, manifest, metrics, checkpoints);
- `evaluation.py`: distance travelled, test metrics, summaries;
- `figures.py`: every figure (PNG);
- `progress.py`: progress bars;
- `processes.py`: joining a multi-process run, and sharding a run over a device mesh;
- `training.py`: the training loop;
- `results.py`: a run read back (`load_run`: config, metrics as arrays, heads at any
  checkpoint) and exported (`export_heads`);
- `compare.py`, `sweep.py`: several runs side by side, and grids of runs over seeds;
- `simulation.py`, `certificate.py`: the `simulate` and `ntk` commands' inputs and reports.

Importing it pulls in PyYAML (and, when figures are drawn, matplotlib); `import meanfield_tf`
does not.
"""


def __getattr__(name: str):
    # imported on first use, so that importing one workflow module does not load the others
    if name in ("load_run", "RunResults", "export_heads"):
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module 'meanfield_tf.workflow' has no attribute {name!r}")
