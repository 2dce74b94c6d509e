"""Implicit differentiation in pure torch: Hessian-vector products, inverse-HVP solvers, hypergradients."""

from sb3_blpo.hypergrad.hvp import (
    HessianVectorProduct,
    flat_grad,
    flatten,
    hessian_vector_product,
    mixed_vector_product,
    parameter_count,
    unflatten_like,
)

__all__ = [
    "HessianVectorProduct",
    "flat_grad",
    "flatten",
    "hessian_vector_product",
    "mixed_vector_product",
    "parameter_count",
    "unflatten_like",
]
