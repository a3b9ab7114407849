"""meanfield_tf: infinitely deep and wide transformers in the mean-field regime, in JAX.

Token measures flow through a continuous-depth neural ODE whose velocity is an average over a
measure of attention heads held as particles. This module is the public face of the numerics;
`meanfield_tf.workflow` turns YAML configs into runs, and `meanfield_tf.cli` is the command line.
See the README and `docs/` for the maths.

`meanfield_tf.load_run(path)` reads a training run directory back (its config, metrics as NumPy
columns, and its heads at any kept checkpoint); it is loaded on first use.
"""

from ._adjoint import adjoint_velocity as adjoint_velocity
from ._adjoint import gradient_field as gradient_field
from ._attention import AbstractKernel as AbstractKernel
from ._attention import ChunkedKernel as ChunkedKernel
from ._attention import DenseKernel as DenseKernel
from ._attention import attention_velocity as attention_velocity
from ._cudnn_kernel import CudnnKernel as CudnnKernel
from ._dependence import DependenceTest as DependenceTest
from ._depth import AbstractStepping as AbstractStepping
from ._depth import AdaptiveSteps as AdaptiveSteps
from ._depth import FixedSteps as FixedSteps
from ._depth import integrate_depth as integrate_depth
from ._errors import ConfigError as ConfigError
from ._euler_adjoint import euler_flow as euler_flow
from ._euler_adjoint import euler_risk_and_gradient as euler_risk_and_gradient
from ._errors import InputError as InputError
from ._errors import MeanFieldError as MeanFieldError
from ._errors import SolverError as SolverError
from ._explicit import AdjointSolution as AdjointSolution
from ._explicit import Explicit as Explicit
from ._explicit import explicit_adjoint as explicit_adjoint
from ._flow import AttentionField as AttentionField
from ._flow import FlowSolution as FlowSolution
from ._flow import check_converged as check_converged
from ._flow import flow as flow
from ._gaussian import GaussianFlowSolution as GaussianFlowSolution
from ._gaussian import gaussian_flow as gaussian_flow
from ._geometry import AbstractGeometry as AbstractGeometry
from ._geometry import Euclidean as Euclidean
from ._geometry import Sphere as Sphere
from ._l2_attention import ChunkedL2Kernel as ChunkedL2Kernel
from ._l2_attention import L2Kernel as L2Kernel
from ._sinkhorn import ChunkedSinkhornKernel as ChunkedSinkhornKernel
from ._sinkhorn import SinkhornKernel as SinkhornKernel
from ._sinkhorn import sinkhorn_gaussian_limit as sinkhorn_gaussian_limit
from ._sinkhorn import sinkhorn_gaussian_velocity as sinkhorn_gaussian_velocity
from ._gradients import AbstractGradientMethod as AbstractGradientMethod
from ._gradients import Autodiff as Autodiff
from ._gradients import Backsolve as Backsolve
from ._gradients import risk_and_gradient as risk_and_gradient
from ._heads import HeadMeasure as HeadMeasure
from ._native_attention import NativeKernelStatus as NativeKernelStatus
from ._native_attention import native_kernel_status as native_kernel_status
from ._native_attention import native_kernels as native_kernels
from ._native_attention import set_native_kernels as set_native_kernels
from ._heads import gaussian_heads as gaussian_heads
from ._heads import symmetric_heads as symmetric_heads
from ._units import GELU as GELU
from ._units import AbstractActivation as AbstractActivation
from ._units import Block as Block
from ._units import ReLU as ReLU
from ._units import Tanh as Tanh
from ._units import gaussian_units as gaussian_units
from ._injectivity import Certificate as Certificate
from ._injectivity import NTKTest as NTKTest
from ._injectivity import hessian_test as hessian_test
from ._injectivity import injectivity_certificate as injectivity_certificate
from ._injectivity import lse_test as lse_test
from ._injectivity import ntk_test as ntk_test
from ._injectivity import zero_velocity_readout as zero_velocity_readout
from ._ntk import NTKSpectrum as NTKSpectrum
from ._ntk import QueryOutputs as QueryOutputs
from ._ntk import ReadoutQuery as ReadoutQuery
from ._ntk import TokenOutputs as TokenOutputs
from ._ntk import ntk_blocks as ntk_blocks
from ._ntk import ntk_gram as ntk_gram
from ._ntk import ntk_jacobian as ntk_jacobian
from ._ntk import predicted_slope as predicted_slope
from ._pallas_kernel import PallasKernel as PallasKernel
from ._precision import BF16 as BF16
from ._precision import FLOAT32 as FLOAT32
from ._precision import PRECISIONS as PRECISIONS
from ._precision import TF32 as TF32
from ._precision import Precision as Precision
from ._risks import AbstractRisk as AbstractRisk
from ._risks import QueryClassification as QueryClassification
from ._risks import QueryRegression as QueryRegression
from ._risks import SinkhornRisk as SinkhornRisk
from ._risks import TokenRegression as TokenRegression
from ._sharding import gather_to_host as gather_to_host
from ._sharding import make_mesh as make_mesh
from ._sharding import shard_batch as shard_batch
from ._sharding import shard_heads as shard_heads
from ._sharding import shard_like_heads as shard_like_heads
from ._sharding import shard_tokens as shard_tokens
from ._solvers import ClassicalRK4 as ClassicalRK4
from ._solvers import DepthSolver as DepthSolver
from ._tasks import AbstractTask as AbstractTask
from ._tasks import Batch as Batch
from ._tasks import Digits as Digits
from ._tasks import DistributionMatching as DistributionMatching
from ._tasks import InContextRegression as InContextRegression
from ._tasks import TeacherStudent as TeacherStudent
from ._tasks import evaluate_batch as evaluate_batch
from ._tasks import in_context_regression_batch as in_context_regression_batch
from ._tasks import perturbed_heads as perturbed_heads
from ._tokens import Discrete as Discrete
from ._tokens import Gaussian as Gaussian
from ._tokens import GaussianMixture as GaussianMixture
from ._tokens import TokenBatch as TokenBatch
from ._tokens import UniformBall as UniformBall
from ._tokens import UniformBox as UniformBox
from ._tokens import families_from_tokens as families_from_tokens
from ._tokens import sample_tokens as sample_tokens
from ._training import GradientFlowOptimizer as GradientFlowOptimizer
from ._training import MeanFieldGradient as MeanFieldGradient
from ._training import StepInfo as StepInfo
from ._training import TrainingDiverged as TrainingDiverged
from ._training import TrainStep as TrainStep
from ._training import conditional_w2 as conditional_w2
from ._training import gradient_flow_optimizer as gradient_flow_optimizer
from ._training import init_optimizer as init_optimizer
from ._training import make_train_step as make_train_step
from ._training import particle_norm as particle_norm
from ._training import set_learning_rate as set_learning_rate

__version__ = "0.1.0"


def __getattr__(name: str):
    # `load_run` reads run directories (YAML): imported from the application layer only when
    # asked, so that `import meanfield_tf` stays free of it.
    if name == "load_run":
        from .workflow import load_run

        return load_run
    raise AttributeError(f"module 'meanfield_tf' has no attribute {name!r}")

