"""meanfield_tf: infinitely deep and wide transformers in the mean-field regime, in JAX.

Token measures flow through a continuous-depth neural ODE whose velocity is an average over a
measure of attention heads held as particles. See the README and DESIGN notes for the maths.
"""

from ._attention import AttentionKernel as AttentionKernel
from ._attention import ChunkedKernel as ChunkedKernel
from ._attention import DenseKernel as DenseKernel
from ._attention import attention_velocity as attention_velocity
from ._depth import AdaptiveSteps as AdaptiveSteps
from ._depth import FixedSteps as FixedSteps
from ._depth import integrate_depth as integrate_depth
from ._errors import ConfigError as ConfigError
from ._errors import InputError as InputError
from ._errors import MeanFieldError as MeanFieldError
from ._errors import SolverError as SolverError
from ._flow import AttentionField as AttentionField
from ._flow import FlowSolution as FlowSolution
from ._flow import check_converged as check_converged
from ._flow import flow as flow
from ._gaussian import GaussianFlowSolution as GaussianFlowSolution
from ._gaussian import gaussian_flow as gaussian_flow
from ._heads import HeadMeasure as HeadMeasure
from ._heads import gaussian_heads as gaussian_heads
from ._heads import symmetric_heads as symmetric_heads
from ._tokens import Discrete as Discrete
from ._tokens import Gaussian as Gaussian
from ._tokens import GaussianMixture as GaussianMixture
from ._tokens import TokenBatch as TokenBatch
from ._tokens import UniformBall as UniformBall
from ._tokens import UniformBox as UniformBox
from ._tokens import sample_tokens as sample_tokens
from ._solvers import ClassicalRK4 as ClassicalRK4

__version__ = "0.1.0"
