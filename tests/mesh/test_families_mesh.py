"""The newer families pruned on 8 fake CPU devices equal the single-device run, bitwise (issue 17).

Run through tests/test_mesh.py (a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``). Tiny
one-block models with random weights, pruned with Wanda, the calibration batch split over the data axis:
Mixtral (hidden 32, 4 experts of width 32, top 2: Wanda needs each expert's Hessian diagonal over the tokens routed
to it, so this checks the routing and the per-expert accumulation; the stacked expert kernels ``(E, d_in, d_out)``
are replicated, their declared sharding), Gemma 3 text (a sliding layer shorter than the sequence, q/k norms, GeGLU)
and Phi-3 (fused kernels, sharded along their outputs like any other).
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from proxjax.core import sharding
from proxjax.models import LlamaConfig, LlamaForCausalLM
from proxjax.pipeline import prune as pipeline


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)
CONFIGS = {
    # 4 experts of width 32, top 2: 4 attention linears + 3 projections of each expert
    "mixtral": (dict(architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=2), 4 + 3 * 4),
    # Gemma 3 text: a sliding layer (window 4 < the 16 calibration positions), q/k norms, GeGLU, pre/post norms
    "gemma3": (dict(architecture="Gemma3ForCausalLM", head_dim=16, sliding_window=4,
                    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True), 7),
    # Phi-3: fused qkv_proj and gate_up_proj, each pruned as one kernel
    "phi3": (dict(architecture="Phi3ForCausalLM"), 4),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_family_wanda_on_a_mesh_equals_one_device(kind):
  overrides, linears = CONFIGS[kind]
  config = LlamaConfig(**SMALL | overrides)
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
  assert many_reports == one_reports and len(one_reports) == linears
  assert all(r[2] == "wanda" for r in one_reports)  # every expert had tokens enough: pruned with its own Hessian
  assert one.keys() == many.keys()
  for key in one:
    np.testing.assert_array_equal(many[key], one[key], err_msg=key)
