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
- `simulation.py`, `certificate.py`: the `simulate` and `ntk` commands' inputs and reports.

Importing it pulls in PyYAML (and, when figures are drawn, matplotlib); `import meanfield_tf`
does not.
"""
