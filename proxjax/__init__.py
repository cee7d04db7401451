"""proxjax: exact 2:4 proximal operator, N:M masks, optax transforms and layer-wise pruning in JAX.

The package is layered (each folder imports only the folders before it): ``core`` (the prox, N:M masks, sparsity
specs, optax transforms, sharding) → ``pruning`` (Hessians, baselines, refinement, method configurations,
``prune_kernel``) → ``models`` and ``data`` (Flax NNX LLaMA family, checkpoint I/O, corpora) → ``pipeline`` (whole
models: ``prune_model``, perplexity, the memory planner) → ``training`` (one training loop: fine-tuning, ProxSparse,
ProSparse) → ``workflows`` (what a command does, as a Python function) → ``cli``. The names below are imported on
first use, so ``import proxjax`` is cheap.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys
import types as _types

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


# -- lm-eval backend registration ------------------------------------------------------------------------------------
# ``lm_eval.simple_evaluate(model="proxjax", ...)`` must find the backend (proxjax.pipeline.harness) once proxjax is
# imported, without importing lm-eval here (~0.1 s, and it is an optional extra): the name is registered as a lazy
# placeholder in lm-eval's model registry, now if lm-eval's registry is already imported, else by a one-shot import
# hook the moment it is imported. The backend module itself (JAX, the model) is imported only when lm-eval asks for it.


def _register_lm_eval(registry: _types.ModuleType) -> None:
  models = registry.model_registry
  if "proxjax" not in models:
    if len(models) == 0:  # lm-eval registers its own backends on lookup only while its registry is empty
      _importlib.import_module("lm_eval.models")
    models.register("proxjax", target="proxjax.pipeline.harness:ProxjaxLM")


class _LmEvalRegistryHook:
  """A ``sys.meta_path`` finder that registers the backend right after ``lm_eval.api.registry`` is executed."""

  name = "lm_eval.api.registry"

  def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
    del path, target
    if fullname != self.name:
      return None
    _sys.meta_path.remove(self)
    spec = _importlib_util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      loader = spec.loader

      class Loader:  # the original loader, then the registration
        create_module = staticmethod(loader.create_module)

        @staticmethod
        def exec_module(module: _types.ModuleType) -> None:
          loader.exec_module(module)
          _register_lm_eval(module)

      spec.loader = Loader()
    return spec


def _hook_lm_eval() -> None:
  registry = _sys.modules.get(_LmEvalRegistryHook.name)
  if registry is not None:
    _register_lm_eval(registry)
  elif not any(isinstance(f, _LmEvalRegistryHook) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _LmEvalRegistryHook())


_hook_lm_eval()
