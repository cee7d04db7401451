"""proxjax: exact 2:4 proximal operator, N:M masks, optax transforms and layer-wise pruning in JAX.

The package is layered (each folder imports only the folders before it): ``core`` (the prox, N:M masks, sparsity
specs, optax transforms, sharding) → ``pruning`` (Hessians, baselines, refinement, method configurations,
``prune_kernel``) → ``models`` and ``data`` (Flax NNX LLaMA family, checkpoint I/O, corpora) → ``pipeline`` (whole
models: ``prune_model``, perplexity, the memory planner) → ``training`` (one training loop: fine-tuning, ProxSparse,
ProSparse) → ``workflows`` (what a command does, as a Python function) → ``cli``. The names below are imported on
first use, so ``import proxjax`` is cheap.
"""

from proxjax.core.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "proxjax.core.xla": ["CPU_FAST_MATH"],
    "proxjax.core.nm": ["is_nm", "nm_mask", "project_nm"],
    "proxjax.core.prox": ["prox_24", "regularizer_24"],
    "proxjax.core.spec": ["default_spec", "resolve_spec"],
    "proxjax.core.transforms": ["masked_updates", "project_nm_update", "prox_24_update"],
    "proxjax.pruning.baselines": ["magnitude_mask", "sparsegpt", "wanda_mask"],
    "proxjax.pruning.calibration": ["HessianState", "hessian_from_state", "hessian_init", "hessian_update",
                                    "input_norms"],
    "proxjax.pruning.pruner": ["PruneInfo", "PruneResult", "Schedule", "beta_for_budget", "estimate_iterations",
                               "prune_kernel"],
    "proxjax.pruning.refine": ["refine_cg", "refine_gd", "relative_local_loss"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
