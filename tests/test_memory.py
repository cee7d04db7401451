"""The memory and time model (``proxjax.pipeline.memory``): hand-computed parts, XLA's own numbers, scaling, validation.

Everything here is abstract (``jax.ShapeDtypeStruct`` / ``nnx.eval_shape``): nothing big is allocated, only small
programs are compiled (a few seconds on 2 cores).

Measured vs predicted: XLA:CPU's ``memory_analysis()`` of the real compiled pieces (the pruner's ``setup``,
``prox_loop``, ``finish``, SparseGPT's ``baseline``, the pipeline's block forward and Hessian accumulations) must be
at most the model's prediction, and the prediction at most 2x the measurement, for the bytes live during the piece
(arguments + outputs + temporaries). The arguments and outputs are predicted exactly (they are shapes); the slack is
in the temporaries, where the model takes a sum or the larger of phases that XLA's buffer assignment overlaps:
measured ratios 1.01-1.65 (largest for Wanda, whose temporaries XLA fuses away entirely, and for bf16 blocks, whose
float32 kernel copies XLA:CPU does not all keep live at once). The accumulations are compiled as the pipeline calls
them (one Hessian state per distinct input), so their outputs are exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from proxjax.pipeline import memory
from proxjax.pruning.methods import PruneConfig
from proxjax.models import LlamaConfig

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SMOL_BLOCK = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, dtype="bfloat16")
LLAMA2_70B = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, dtype="bfloat16")


def _phase(est, name):
  return next(p for p in est.phases if p.name == name)


# ------------------------------------------------------------------------------------------------ hand counts --


def test_tiny_parts_equal_hand_counts():
  # TINY: D = 32, I = 64, 4 heads of 8, 2 blocks, float32; N = 4 sequences of T = 16, batch b = 2.
  est = memory.estimate(TINY, nsamples=4, seqlen=16, batch_size=2)
  assert est.param_bytes == 4 and est.batch_size == 2 and est.refine_steps == 200
  assert est.iterations == memory.DEFAULT_PROX_ITERATIONS == 1500
  assert est.host["calibration activations"] == 2 * 4 * 16 * 32 * 4  # inputs and outputs of a block, float32
  block_params = 2 * 32 + 4 * 32 * 32 + 2 * 32 * 64 + 64 * 32  # norms, q/k/v/o, gate/up, down
  assert est.params == {"total": 2 * block_params + 2 * 64 * 32 + 32, "pruned": 2 * (block_params - 64),
                        "dense": 2 * 64 + 2 * 64 * 32 + 32}
  assert est.host["model weights"] == 4 * est.params["total"]

  qkv = _phase(est, "accumulate q_proj+k_proj+v_proj").parts
  state = 32 * 32 * 4 + 4  # float32 XᵀX + int32 count, one per distinct input: q, k, v share one
  batch = 2 * 16 * 32 * 4 + 2 * 16  # (b, T, D) float32 + the bool validity mask
  assert qkv["weights"] == 4 * block_params
  assert qkv["rope"] == 2 * 16 * 8 * 4  # cos, sin (T, head_dim)
  assert qkv["hessian states in"] == qkv["hessian states out"] == state
  assert qkv["batch"] == qkv["next batch (async)"] == batch
  # Only the norm runs; the largest temporary: the input, its masked copy and the partial XᵀX.
  assert qkv["pass temporaries"] == 2 * 2 * 16 * 32 * 4 + 32 * 32 * 4
  # The pipeline drops the previous stage's states, H and result before every pass: nothing stale is counted.
  assert all(set(p.parts) == set(est.phases[0].parts) for p in est.phases if p.name.startswith("accumulate"))
  assert set(_phase(est, "propagate").parts) == {"weights", "rope", "batch", "output", "pass temporaries"}
  gate_up = _phase(est, "accumulate gate_proj+up_proj").parts
  assert gate_up["hessian states in"] == state  # gate and up share one state too

  # Within a stage the previous linear's result (pruned float32 kernel + bool mask) is still referenced; the first
  # linear of a stage finds none (the previous stage's was dropped).
  assert _phase(est, "prune q_proj: prox_loop").parts["previous result"] == 0
  assert _phase(est, "prune k_proj: prox_loop").parts["previous result"] == 32 * 32 * 5
  assert _phase(est, "prune k_proj: prox_loop").parts["hessian states"] == state
  assert _phase(est, "prune up_proj: prox_loop").parts["previous result"] == 32 * 64 * 5

  down = _phase(est, "prune down_proj: prox_loop").parts
  k32 = 64 * 32 * 4  # float32 copy of the down kernel
  assert down["hessian states"] == 64 * 64 * 4 + 4
  assert down["hessian H"] == 64 * 64 * 4
  assert down["previous result"] == 0  # down_proj is alone in its stage
  assert down["pruner arrays"] == (64 * 64 * 4 + 2 * 64 * 4 + 64 + 4) + k32  # H̃, scale, inv_scale, live, L; K̃₀
  assert down["pruner outputs"] == k32 + 64 * 32  # Ṽ and the mask
  assert down["pruner temporaries"] == 8 * k32 + 16 * 4 * (64 + 32)
  assert est.peak.name == "prune down_proj: prox_loop" and est.peak_bytes == sum(down.values()) == 182088
  assert est.peak_bytes == max(p.total for p in est.phases)


def test_flops_hand_counts():
  est = memory.estimate(TINY, nsamples=4, seqlen=16, batch_size=2, iterations=10, refine_steps=5)
  # Prox: iterations x 2·d_in²·d_out per linear (q,k,v,o,gate,up: d_in 32; down: d_in 64).
  mm = {n: 2 * d_in * d_in * d_out for n, (d_in, d_out) in
        {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "g": (32, 64), "u": (32, 64),
         "d": (64, 32)}.items()}
  assert est.block_cost["prox"].flops == 10 * sum(mm.values())
  assert est.block_cost["refine"].flops == (5 + 2) * sum(mm.values())  # CG steps + its two starting matmuls
  # Hessians: 2·tokens·d_in² per distinct input (x, attn, y: 32; hidden: 64), 64 tokens.
  assert est.block_cost["hessians"].flops == 2 * 64 * (3 * 32 ** 2 + 64 ** 2)
  assert est.block_cost["prox"].seconds is None
  timed = memory.estimate(TINY, nsamples=4, seqlen=16, iterations=10, flops_per_s=1e12, bytes_per_s=1e9)
  prox = timed.block_cost["prox"]
  assert prox.seconds == pytest.approx(max(prox.flops / 1e12, prox.bytes / 1e9))
  assert timed.total.seconds == pytest.approx(timed.num_blocks * timed.block.seconds)
  assert memory.estimate(TINY, nsamples=4, seqlen=16, method=PruneConfig.from_options("prox", budget=300)).iterations == 300
  sgpt = memory.estimate(TINY, nsamples=4, seqlen=16, method="sparsegpt")
  assert sgpt.refine is None and sgpt.iterations == 0 and "prox" not in sgpt.block_cost
  assert sgpt.block_cost["baseline"].flops > 0


def test_linear_cost_sums_to_block_cost():
  # The per-linear model (used against a report's per-layer seconds) is exactly the estimate's, linear by linear.
  est = memory.estimate(TINY, nsamples=4, seqlen=16, iterations=10, refine_steps=5)
  shapes = [(32, 32)] * 4 + [(32, 64)] * 2 + [(64, 32)]
  per = [memory.linear_cost(*s, iterations=10, refine_steps=5) for s in shapes]
  for key in ("setup", "prox", "refine", "losses"):
    assert sum(p[key].flops for p in per) == est.block_cost[key].flops
    assert sum(p[key].bytes for p in per) == est.block_cost[key].bytes
  timed = memory.linear_cost(64, 32, iterations=10, refine_steps=5, flops_per_s=1e9, bytes_per_s=1e9)
  assert timed["prox"].seconds == pytest.approx(max(timed["prox"].flops, timed["prox"].bytes) / 1e9)
  wanda = memory.linear_cost(64, 32, method="wanda", iterations=10)
  assert sorted(wanda) == ["baseline", "losses", "setup"] and wanda["setup"].flops == 0  # no eigvalsh, no loop
  with pytest.raises(ValueError, match="iterations must be a non-negative int"):
    memory.linear_cost(64, 32, iterations=-1)


# ------------------------------------------------------------------------------------- measured vs predicted --


def _ratio_ok(pred, meas):
  assert set(pred) == set(meas)
  ratios = {k: pred[k].total / meas[k].total for k in meas}
  assert all(1.0 <= r <= 2.0 for r in ratios.values()), ratios
  return ratios


def test_pruner_pieces_bound_xla_prox_cg():
  # K = 512 KiB dominates H = 256 KiB: the prox loop's 8K temporaries are most of it (XLA:CPU: 7.8K).
  pred = memory.pruner_pieces(256, 512)
  meas = memory.measure_pruner(256, 512)
  ratios = _ratio_ok(pred, meas)
  assert ratios["prox_loop"] < 1.1 and ratios["finish"] < 1.1
  # Outputs are shapes: exact up to XLA's scalars and tuple index tables.
  assert all(0 <= meas[k].outputs - pred[k].outputs <= 64 for k in meas)


@pytest.mark.parametrize("method, refine", [("prox", "cg"), ("prox", "gd"), ("prox", None), ("wanda", None)])
def test_pruner_pieces_bound_xla_bfloat16(method, refine):
  # A bfloat16 kernel: refined, finish keeps the float32 result beside its bfloat16 cast (one K more).
  pred = memory.pruner_pieces(256, 512, method=method, refine=refine, param_bytes=2)
  meas = memory.measure_pruner(256, 512, method=method, refine=refine, param_dtype=jnp.bfloat16)
  ratios = _ratio_ok(pred, meas)
  if refine is not None:
    assert ratios["finish"] < 1.1


def test_pruner_pieces_bound_xla_sparsegpt():
  # H (1 MiB) larger than the kernel (K = 512 KiB): SparseGPT's factorizations dominate.
  _ratio_ok(memory.pruner_pieces(512, 256, method="sparsegpt"), memory.measure_pruner(512, 256, method="sparsegpt"))


@pytest.mark.parametrize("config, batch, seqlen, dtype", [
    (SMOL_BLOCK, 2, 128, jnp.float32),  # SmolLM2's block: MLP and attention of similar size (ratios 1.06-1.26)
    (SMOL_BLOCK, 1, 256, jnp.bfloat16),  # attention scores dominate; bf16 kernels are converted to float32
])
def test_block_passes_bound_xla(config, batch, seqlen, dtype):
  pb = jnp.dtype(dtype).itemsize
  pred = memory.block_passes(config, batch_size=batch, seqlen=seqlen, param_bytes=pb)
  meas = memory.measure_block(config, batch_size=batch, seqlen=seqlen, param_dtype=dtype)
  ratios = _ratio_ok(pred, meas)
  print({k: round(r, 3) for k, r in ratios.items()})
  for key in meas:  # arguments are shapes: exact (XLA's count of what it reads is a subset)
    assert pred[key].arguments == meas[key].inputs >= meas[key].arguments
  for key in meas:  # one state per distinct input, compiled as the pipeline calls it: the outputs are exact too
    if key.startswith("accumulate"):
      assert 0 <= meas[key].outputs - pred[key].outputs <= 64, (key, meas[key].outputs, pred[key].outputs)


# -------------------------------------------------------------------------------------------------- scaling --


def test_nsamples_scales_host_not_device():
  a = memory.estimate(LLAMA2_7B, nsamples=64, seqlen=2048)
  b = memory.estimate(LLAMA2_7B, nsamples=128, seqlen=2048)
  assert b.host["calibration activations"] == 2 * a.host["calibration activations"]
  assert b.peak_bytes == a.peak_bytes
  assert b.block_cost["forward"].flops == pytest.approx(2 * a.block_cost["forward"].flops)
  assert b.block_cost["prox"].flops == a.block_cost["prox"].flops  # pruning does not see N


def test_model_devices_split_kernels():
  one = memory.pruner_pieces(4096, 11008, param_bytes=2)
  eight = memory.pruner_pieces(4096, 11008, param_bytes=2, model_devices=8)
  assert eight["prox_loop"].outputs * 8 == one["prox_loop"].outputs  # Ṽ and the mask split over d_out
  assert eight["finish"].outputs * 8 == one["finish"].outputs
  h = 4096 * 4096 * 4  # H̃ stays replicated
  assert eight["prox_loop"].arguments - h == (one["prox_loop"].arguments - h) // 8
  e1 = memory.estimate(LLAMA2_7B, nsamples=128, seqlen=2048)
  e8 = memory.estimate(LLAMA2_7B, nsamples=128, seqlen=2048, model_devices=8)
  norms = 2 * 4096 * 2  # replicated
  assert e8.phases[0].parts["weights"] - norms == (e1.phases[0].parts["weights"] - norms) // 8
  assert e8.batch_size == 8 and e8.device_batch == 1
  assert e8.peak_bytes < e1.peak_bytes
  # 13 does not divide 4096: the kernels are replicated, as proxjax.core.sharding does.
  assert memory.pruner_pieces(4096, 4096, model_devices=13) == memory.pruner_pieces(4096, 4096)


def test_llama_70b_bf16_fits_80gb():
  est = memory.estimate(LLAMA2_70B, nsamples=128, seqlen=2048)
  print(f"70B bf16, 128 x 2048, 1 device: peak {est.peak_bytes / 2 ** 30:.1f} GiB ({est.peak.name}), "
        f"host {est.host_bytes / 2 ** 30:.1f} GiB")
  assert est.peak_bytes < 80e9
  assert est.host["calibration activations"] == 2 * 128 * 2048 * 8192 * 4
  text = memory.format_estimate(est)
  assert "peak" in text and "whole model (80 blocks)" in text


# ---------------------------------------------------------------------------------------------- validation --


@pytest.mark.parametrize("kwargs, match", [
    (dict(nsamples=0, seqlen=16), "nsamples must be a positive int"),
    (dict(nsamples=4, seqlen=-1), "seqlen must be a positive int"),
    (dict(nsamples=4, seqlen=16, method="random"), "unknown method"),
    (dict(nsamples=4, seqlen=16, refine="adam"), "refine must be one of"),
    (dict(nsamples=4, seqlen=16, model_devices=0), "model_devices must be a positive int"),
    (dict(nsamples=4, seqlen=16, flops_per_s=-1.0), "flops_per_s must be a positive number"),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    memory.estimate(TINY, **kwargs)


def test_invalid_config():
  with pytest.raises(ValueError, match="config must be a proxjax.models.LlamaConfig"):
    memory.estimate({"hidden_size": 32}, nsamples=4, seqlen=16)
  with pytest.raises(ValueError, match="config must be a proxjax.models.LlamaConfig"):
    memory.block_passes("llama", batch_size=1, seqlen=4)
