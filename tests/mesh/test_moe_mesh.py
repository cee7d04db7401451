"""A mixture of experts pruned on 8 fake CPU devices equals the single-device run, bitwise (issue 17).

Run through tests/test_mesh.py (a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``). One tiny
one-block Mixtral (hidden 32, 4 experts of width 32, top 2; random weights): Wanda needs each expert's Hessian
diagonal over the tokens routed to it, so it checks the routing and the per-expert accumulation with the
calibration batch split over the data axis; the stacked expert kernels ``(E, d_in, d_out)`` are replicated (their
declared sharding), each expert is pruned with :func:`proxjax.prune_kernel` on the mesh.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from proxjax.core import sharding
from proxjax.models import LlamaConfig, LlamaForCausalLM
from proxjax.pipeline import prune as pipeline


def test_moe_wanda_on_a_mesh_equals_one_device():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, architecture="MixtralForCausalLM", num_experts=4,
                       num_experts_per_tok=2)
  ids = np.random.default_rng(0).integers(0, 64, (8, 16))
  out = {}
  for name, mesh in (("one", None), ("mesh", sharding.make_mesh(model=4, data=2))):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    result = pipeline.prune_model(model, ids, "wanda", progress=False, mesh=mesh, min_expert_tokens=8,
                                  true_sequential=False)
    out[name] = ({"/".join(map(str, k)): np.asarray(v.get_value())
                  for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))},
                 [(r.name, r.tokens, r.method) for r in result.layers])
  (one, one_reports), (many, many_reports) = out["one"], out["mesh"]
  assert many_reports == one_reports and len(one_reports) == 4 + 3 * 4
  assert all(r[2] == "wanda" for r in one_reports)  # every expert had tokens enough: pruned with its own Hessian
  assert one.keys() == many.keys()
  for key in one:
    np.testing.assert_array_equal(many[key], one[key], err_msg=key)
