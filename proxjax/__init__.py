"""proxjax: exact 2:4 proximal operator, N:M masks, optax transforms and layer-wise pruning in JAX."""

from proxjax._xla import CPU_FAST_MATH
from proxjax.baselines import magnitude_mask, sparsegpt, wanda_mask
from proxjax.calibration import HessianState, hessian_from_state, hessian_init, hessian_update, input_norms
from proxjax.nm import is_nm, nm_mask, project_nm
from proxjax.prox import prox_24, regularizer_24
from proxjax.pruner import PruneInfo, PruneResult, Schedule, beta_for_budget, estimate_iterations, prune_kernel
from proxjax.refine import refine_cg, refine_gd, relative_local_loss
from proxjax.spec import default_spec, resolve_spec
from proxjax.transforms import masked_updates, project_nm_update, prox_24_update

__version__ = "0.1.0"

__all__ = [
    "CPU_FAST_MATH",
    "HessianState",
    "PruneInfo",
    "PruneResult",
    "Schedule",
    "beta_for_budget",
    "default_spec",
    "estimate_iterations",
    "hessian_from_state",
    "hessian_init",
    "hessian_update",
    "input_norms",
    "is_nm",
    "magnitude_mask",
    "masked_updates",
    "nm_mask",
    "project_nm",
    "project_nm_update",
    "prox_24",
    "prox_24_update",
    "prune_kernel",
    "refine_cg",
    "refine_gd",
    "regularizer_24",
    "relative_local_loss",
    "resolve_spec",
    "sparsegpt",
    "wanda_mask",
]
