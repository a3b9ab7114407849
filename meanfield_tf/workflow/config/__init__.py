"""Every configuration schema of the command line, in one home.

- `strict.py`: the machinery (strict dataclasses from plain data and YAML, dotted overrides).
- `sections.py`: the shared sections (tokens, heads, solver, mesh, distributed) and the
  `simulate` and `ntk` configs.
- `train.py`: the training config (tasks, the gradient flow and the run's cadence).
"""

from .sections import DistributedConfig as DistributedConfig
from .sections import HeadsConfig as HeadsConfig
from .sections import MeshConfig as MeshConfig
from .sections import NTKConfig as NTKConfig
from .sections import SimulateConfig as SimulateConfig
from .sections import SolverConfig as SolverConfig
from .sections import TokensConfig as TokensConfig
from .sections import expand_copies as expand_copies
from .strict import apply_overrides as apply_overrides
from .strict import from_dict as from_dict
from .strict import load_config as load_config
from .strict import read_yaml as read_yaml
from .strict import to_dict as to_dict
from .train import TrainConfig as TrainConfig
from .train import TrainSection as TrainSection
from .train import load_train_config as load_train_config
from .train import train_config_from_dict as train_config_from_dict
from .train import train_config_to_dict as train_config_to_dict
