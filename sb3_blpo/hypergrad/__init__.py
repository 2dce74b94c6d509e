"""Implicit differentiation in pure torch: Hessian-vector products, inverse-HVP solvers, hypergradients."""

from sb3_blpo.hypergrad.hvp import (
    CurvatureOperator,
    GaussNewtonProduct,
    HessianVectorProduct,
    flat_grad,
    flatten,
    hessian_vector_product,
    mixed_vector_product,
    parameter_count,
    unflatten_like,
    unique_parameters,
)
from sb3_blpo.hypergrad.implicit import Hypergradient, bound_correction, implicit_hypergradient
from sb3_blpo.hypergrad.jacobian import (
    JacobianBlock,
    JacobianGaussNewtonProduct,
    LinearLayerRecorder,
    OutputMixedProduct,
    PerSampleJacobian,
)
from sb3_blpo.hypergrad.solvers import (
    SOLVERS,
    ConjugateGradientSolver,
    DenseSolver,
    IHVPResult,
    IHVPSolver,
    NeumannSolver,
    NystromSolver,
    make_solver,
)

__all__ = [
    "SOLVERS",
    "ConjugateGradientSolver",
    "CurvatureOperator",
    "DenseSolver",
    "GaussNewtonProduct",
    "HessianVectorProduct",
    "Hypergradient",
    "IHVPResult",
    "IHVPSolver",
    "JacobianBlock",
    "JacobianGaussNewtonProduct",
    "LinearLayerRecorder",
    "NeumannSolver",
    "NystromSolver",
    "OutputMixedProduct",
    "PerSampleJacobian",
    "bound_correction",
    "flat_grad",
    "flatten",
    "hessian_vector_product",
    "implicit_hypergradient",
    "make_solver",
    "mixed_vector_product",
    "parameter_count",
    "unflatten_like",
    "unique_parameters",
]
