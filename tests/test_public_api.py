"""The public surface: every name ``proxjax`` and ``proxjax.models`` exported before the package was layered still
imports (lazily: ``import proxjax`` alone imports no JAX)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import proxjax
import proxjax.models

TOP = ["CPU_FAST_MATH", "HessianState", "PruneInfo", "PruneResult", "Schedule", "beta_for_budget", "default_spec",
       "estimate_iterations", "hessian_from_state", "hessian_init", "hessian_update", "input_norms", "is_nm",
       "magnitude_mask", "masked_updates", "nm_mask", "project_nm", "project_nm_update", "prox_24", "prox_24_update",
       "prune_kernel", "refine_cg", "refine_gd", "regularizer_24", "relative_local_loss", "resolve_spec", "sparsegpt",
       "wanda_mask"]
MODELS = ["CheckpointError", "LINEAR_NAMES", "LlamaAttention", "LlamaConfig", "LlamaDecoderLayer", "LlamaForCausalLM",
          "LlamaMLP", "LlamaModel", "LlamaRMSNorm", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "apply_rope",
          "check_sparsity", "dtype_from_name", "hf_to_path", "load_pretrained", "path_to_hf", "restore_state",
          "rope_inv_freq", "save_pretrained", "save_state"]


@pytest.mark.parametrize("module, names", [(proxjax, TOP), (proxjax.models, MODELS)])
def test_every_public_name_of_before_still_imports(module, names):
  assert set(names) <= set(module.__all__) and set(names) <= set(dir(module))
  for name in names:
    assert getattr(module, name) is not None, name
  with pytest.raises(AttributeError, match="no attribute"):
    getattr(module, "not_a_name")


def test_import_proxjax_imports_no_jax():
  code = "import sys, proxjax, proxjax.models; print('JAX' if 'jax' in sys.modules else 'NO-JAX', proxjax.__version__)"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.stdout.split()[0] == "NO-JAX", proc.stdout + proc.stderr


def test_family_naming_is_public():
  """What the pipeline, the memory planner and ``proxjax check`` name every family's linears with (issue 17)."""
  names = ["expert_names", "hf_names", "hf_to_slot", "linear_names"]
  assert set(names) <= set(proxjax.models.__all__)
  assert proxjax.models.hf_to_slot("model.layers.2.block_sparse_moe.experts.1.w3.weight")[1] == 1
