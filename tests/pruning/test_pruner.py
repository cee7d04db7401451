"""The layer-wise prox pruner (``proxjax.pruning.pruner``): the toy layer, masks, layouts, edge cases, compiles."""

from __future__ import annotations

import contextlib
import logging

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import proxjax
from proxjax.pruning import baselines
from proxjax.pruning import pruner
from proxjax.pruning.methods import ProxConfig, PruneConfig
from proxjax.pruning.pruner import prune_kernel
from proxjax.core.toy import correlated_pairs_layer


def _toy(seed: int = 0):
  """docs/method.md, "The toy layer": d_in = 64, d_out = 32, n = 4000, features in correlated pairs, scales U(0.5, 2), W ~ N(0, 1)."""
  k, _, h = correlated_pairs_layer(seed=seed)
  return k, h.astype(np.float32)


# The pruner's jitted pieces are compiled once per kernel shape, dtype and static option (the prox loop, with the prox
# inlined, is the costliest): _small's default shape is the toy layer's, (64, 32), so that the tests share the toy
# fixture's compiles; (16, 16) is the square layer's, and test_one_compile_per_shape_and_options has its own.
SHAPE = (64, 32)


def _small(d_in=SHAPE[0], d_out=SHAPE[1], n=200, seed=1, dead=(), tokens=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(d_in, n if tokens is None else tokens))
  x[1::2] += 0.8 * x[0::2]
  x *= rng.uniform(0.3, 3.0, size=(d_in, 1))
  x[list(dead)] = 0.0
  return rng.normal(size=(d_in, d_out)).astype(np.float32), (x @ x.T / x.shape[1]).astype(np.float32)


def _check_24(res, kernel):
  chex.assert_shape([res.kernel, res.mask], kernel.shape)
  chex.assert_type([res.kernel, res.mask], [kernel.dtype, bool])
  out, mask = np.asarray(res.kernel, np.float32), np.asarray(res.mask)
  np.testing.assert_array_equal(mask.reshape(-1, 4, mask.shape[1]).sum(axis=1), 2)  # exactly 2 per group, axis 0
  np.testing.assert_array_equal(out[~mask], 0.0)
  assert bool(proxjax.is_nm(res.kernel, axis=0))
  assert np.isfinite(res.info.loss_before_refine) and np.isfinite(res.info.loss_after_refine)


@contextlib.contextmanager
def _count_compiles():
  """Collects the names of the XLA compilations that happen inside the block (JAX's compile log)."""
  seen: list[str] = []

  class Handler(logging.Handler):

    def emit(self, record):
      msg = record.getMessage()
      if msg.startswith("Finished XLA compilation"):
        seen.append(msg)

  handler = Handler(logging.DEBUG)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield seen
  finally:
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def toy_results():
  k, h = _toy()
  return k, h, {
      "magnitude": prune_kernel(k, h, "magnitude"),
      "wanda": prune_kernel(k, h, "wanda"),
      "wanda+gd": prune_kernel(k, h, "wanda", refine="gd"),
      "prox+gd": prune_kernel(k, h, "prox", lam0=0.01, beta=1.2, refine="gd", accelerate=False),
      "prox+default": prune_kernel(k, h, "prox", lam0=0.01, beta=1.2, accelerate=False),
      "paper+gd": prune_kernel(k, h, PruneConfig(ProxConfig.paper(), refine="gd")),
      "default+gd": prune_kernel(k, h, "prox", refine="gd"),
  }


def test_the_default_schedule_beats_the_papers_with_far_fewer_iterations(toy_results):
  """docs/method.md, "Acceleration" and "The toy layer": FISTA, budget 150, paced, against λ₀ = 0.01, β = 1.01."""
  _, _, r = toy_results
  default, paper = r["default+gd"].info, r["paper+gd"].info
  assert paper.schedule.beta == pytest.approx(1.01) and paper.iterations > 500
  assert default.iterations < 0.4 * paper.iterations  # 113 against 583
  assert default.loss_after_refine < paper.loss_after_refine < r["prox+gd"].info.loss_after_refine


def test_prox_default_refinement_is_cg_and_matches_gd(toy_results):
  _, _, r = toy_results
  assert r["prox+default"].info.refine == "cg"
  np.testing.assert_allclose(r["prox+default"].info.loss_after_refine, r["prox+gd"].info.loss_after_refine, rtol=1e-3)
  np.testing.assert_array_equal(np.asarray(r["prox+default"].mask), np.asarray(r["prox+gd"].mask))


def test_toy_ordering(toy_results):
  k, _, res = toy_results
  loss = {name: r.info.loss_after_refine for name, r in res.items()}
  print(loss)  # an independent NumPy reconstruction: 0.122, 0.101, 0.044, 0.021
  assert loss["magnitude"] > loss["wanda"] > loss["wanda+gd"] > loss["prox+gd"]
  assert loss["prox+gd"] < 0.7 * loss["wanda+gd"]
  assert 0.08 < loss["magnitude"] < 0.2 and 0.01 < loss["prox+gd"] < 0.035
  for r in res.values():
    _check_24(r, k)
  info = res["prox+gd"].info
  assert not info.cap_hit and info.groups_projected == 0
  assert info.loss_after_refine < info.loss_before_refine
  # Refinement on the same mask is what the baseline "+GD" is: the masks of wanda and wanda+gd agree.
  np.testing.assert_array_equal(np.asarray(res["wanda"].mask), np.asarray(res["wanda+gd"].mask))


def test_toy_iteration_estimate(toy_results):
  k, h, res = toy_results
  info = res["prox+gd"].info
  est = pruner.estimate_iterations(k, h, lam0=0.01, beta=1.2)
  assert est == info.schedule.estimated_iterations
  assert 0.5 <= info.iterations / est <= 2.0, (info.iterations, est)
  # An iteration budget: beta_for_budget's β reaches L·κ in `budget` iterations.
  beta = pruner.beta_for_budget(k, h, 60, lam0=0.01)
  assert pruner.estimate_iterations(k, h, lam0=0.01, beta=beta) in (60, 61)
  used = prune_kernel(k, h, lam0=0.01, budget=60, refine=None).info
  assert abs(used.schedule.beta - beta) < 1e-9
  assert 30 <= used.iterations <= 120


def test_huge_lam0_gives_the_wanda_mask():
  k, h = _toy()
  res = prune_kernel(k, h, lam0=1e8, refine=None)
  assert res.info.iterations == 1
  mask = np.asarray(baselines.wanda_mask(k, h))
  np.testing.assert_array_equal(np.asarray(res.mask), mask)
  np.testing.assert_allclose(np.asarray(res.kernel), np.where(mask, k, 0), rtol=1e-6)


METHODS = [("prox", None), ("prox", "cg"), ("magnitude", None), ("wanda", "cg"), ("sparsegpt", None),
           ("sparsegpt", "gd")]


@pytest.mark.parametrize("method,refine", METHODS)
def test_every_method_is_24_along_axis0(method, refine):
  k, h = _small()
  res = prune_kernel(k, h, method, refine=refine, **({"blocksize": 8} if method == "sparsegpt" else {}))
  _check_24(res, k)
  assert res.info.refine == refine and res.info.method == method
  if refine is None:
    assert res.info.loss_after_refine == res.info.loss_before_refine
    if method != "prox":
      base = dict(magnitude=lambda: baselines.magnitude_mask(k),
                  sparsegpt=lambda: baselines.sparsegpt(k, h, blocksize=8)[1])[method]()
      np.testing.assert_array_equal(np.asarray(res.mask), np.asarray(base))
  else:
    assert res.info.loss_after_refine < res.info.loss_before_refine


def test_bf16_kernel():
  k, h = _small()
  res = prune_kernel(jnp.asarray(k, jnp.bfloat16), h, lam0=0.01, beta=1.3, refine="cg")
  _check_24(res, jnp.asarray(k, jnp.bfloat16))


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_dead_inputs_and_singular_hessian(damp):
  # 10 tokens for 64 inputs (rank <= 10) and two dead inputs; a whole group dead (inputs 8..11) too.
  dead = (3, 8, 9, 10, 11, 20)
  k, h = _small(tokens=10, dead=dead)
  res = prune_kernel(k, h, lam0=0.01, beta=1.3, ridge=damp, refine="cg", refine_ridge=damp)
  _check_24(res, k)
  np.testing.assert_array_equal(np.asarray(res.kernel)[list(dead)], 0.0)
  wanda = prune_kernel(k, h, "wanda", refine="cg")
  assert res.info.loss_after_refine <= wanda.info.loss_after_refine + 1e-3
  assert res.info.loss_after_refine < 0.5  # rank 10 < 32 kept per column: the loss can be small


def _reference_w_layout(w, h, lam0, beta, cap=500, accelerate=False, column_stop=False, pace=0.0,
                        grad_dtype="float32"):
  """The prox-gradient loop transcribed in the PyTorch layout: W (d_out, d_in), groups along rows (axis=-1); with
  ``accelerate``, FISTA's extrapolation (docs/method.md, "Acceleration"); with ``column_stop``, each output (a row
  here) keeps its iterate once it is 2:4; with ``pace``, λ's exponent grows by clip(pace·groups / settled, ½, 2)
  per iteration ("Schedule and iteration estimate"); the gradient's operands rounded to ``grad_dtype`` (ml_dtypes'
  bfloat16), its products summed in float64 and rounded to float32."""
  rounded = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[grad_dtype]
  low = lambda a: np.asarray(a, np.float32).astype(rounded).astype(np.float64)
  d = np.sqrt(np.diag(h)).astype(np.float32)
  wt = (w * d[None, :]).astype(np.float32)  # W̃ = W diag(d)
  ht = (h / np.outer(d, d)).astype(np.float32)  # H̃ = diag(d)⁻¹ H diag(d)⁻¹
  eta = np.float32(1.0 / np.linalg.eigvalsh(ht.astype(np.float64))[-1])
  v, prev, t = wt.copy(), wt.copy(), 1.0
  k, e, left = 0, np.float32(0.0), None
  target = np.float32(pace * v.size / 4)
  while k < cap and np.any((v.reshape(v.shape[0], -1, 4) != 0).sum(-1) > 2):
    if pace:
      now = int(((v.reshape(v.shape[0], -1, 4) != 0).sum(-1) > 2).sum())
      if k > 0:
        e = np.float32(e + np.clip(target / np.float32(max(left - now, 1)), np.float32(0.5), np.float32(2.0)))
      left = now
    else:
      e = np.float32(k)
    lam = np.exp(np.log(np.float32(lam0)) + e * np.log(np.float32(beta)))  # as the pruner forms it
    z = v
    if accelerate:
      t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
      z, t = v + np.float32((t - 1.0) / t_next) * (v - prev), t_next
    grad = (low(z - wt) @ low(ht)).astype(np.float32)
    new = np.asarray(proxjax.prox_24(z - eta * grad, lam, eta, axis=-1))
    if column_stop:
      done = ~np.any((v.reshape(v.shape[0], -1, 4) != 0).sum(-1) > 2, axis=1)
      new = np.where(done[:, None], v, new)
    prev, v = v, new
    k += 1
  return v / d[None, :], k


@pytest.mark.parametrize("accelerate,column_stop,pace,grad_dtype", [
    (False, False, 0.0, "float32"), (True, False, 0.0, "float32"), (True, True, 0.0, "float32"),
    (True, True, 0.05, "float32"), (False, False, 0.0, "bfloat16"), (True, True, 0.0, "bfloat16")])
def test_accelerated_loop_against_w_layout_reference(accelerate, column_stop, pace, grad_dtype):
  k, h = _small(d_in=16, d_out=16, seed=3)
  ref, iters = _reference_w_layout(k.T, h, 0.01, 1.3, accelerate=accelerate, column_stop=column_stop, pace=pace,
                                   grad_dtype=grad_dtype)
  res = prune_kernel(k, h, lam0=0.01, beta=1.3, refine=None, accelerate=accelerate, column_stop=column_stop,
                     pace=pace, grad_dtype=grad_dtype)
  if pace:  # the paced schedule differs from the geometric one here
    geometric = _reference_w_layout(k.T, h, 0.01, 1.3, accelerate=accelerate, column_stop=column_stop)[1]
    assert iters != geometric
  assert res.info.iterations == iters
  np.testing.assert_array_equal(np.asarray(res.mask), ref.T != 0)
  # bfloat16: an operand whose float32 value differs in the last bit (XLA fuses and contracts the arithmetic) can
  # round to the next bfloat16, 2⁻⁸ away, so the values agree to a few 1e-3
  tol = dict(rtol=2e-4, atol=1e-5) if grad_dtype == "float32" else dict(rtol=1e-2, atol=2e-3)
  np.testing.assert_allclose(np.asarray(res.kernel), ref.T, **tol)


def test_square_layer_refined_against_a_dense_solve():
  k, h = _small(d_in=16, d_out=16, seed=3)
  ref, _ = _reference_w_layout(k.T, h, 0.01, 1.3, column_stop=True, grad_dtype="bfloat16")  # the default's mask
  # Refined with CG: each output's masked least squares, solved densely in the W layout.
  mask_w = ref != 0
  want = np.zeros_like(k.T, dtype=np.float64)
  for i in range(16):
    s = mask_w[i]
    want[i, s] = np.linalg.solve(h[np.ix_(s, s)].astype(np.float64), h[s].astype(np.float64) @ k.T[i])
  got = prune_kernel(k, h, lam0=0.01, beta=1.3, refine="cg", refine_steps=30, refine_tol=1e-7, accelerate=False)
  np.testing.assert_allclose(np.asarray(got.kernel), want.T, rtol=1e-4, atol=1e-5)


def test_scan_loop_equals_while_loop_and_cap():
  k, h = _small()
  a = prune_kernel(k, h, lam0=0.01, beta=1.3, refine=None, loop="while")
  b = prune_kernel(k, h, lam0=0.01, beta=1.3, refine=None, loop="scan", cap=200)
  np.testing.assert_array_equal(np.asarray(a.kernel), np.asarray(b.kernel))
  assert a.info.iterations == b.info.iterations
  paced = [prune_kernel(k, h, lam0=0.01, beta=1.3, refine=None, loop=loop, cap=200, pace=0.05) for loop in
           ("while", "scan")]  # the paced schedule's state goes through the scan's no-op steps unchanged
  np.testing.assert_array_equal(np.asarray(paced[0].kernel), np.asarray(paced[1].kernel))
  assert paced[0].info.iterations == paced[1].info.iterations != a.info.iterations
  capped = prune_kernel(k, h, lam0=0.01, beta=1.3, refine=None, cap=3)
  assert capped.info.cap_hit and capped.info.iterations == 3 and capped.info.groups_projected > 0
  _check_24(capped, k)


def test_one_compile_per_shape_and_options():
  k, h = _small(d_in=24, d_out=5, seed=5)  # a shape no other test uses
  with _count_compiles() as first:
    prune_kernel(k, h, lam0=0.01, beta=1.2)
  assert first, "the compile counter saw nothing"
  with _count_compiles() as second:
    res = prune_kernel(k * 2.0, h, lam0=0.003, beta=1.5, ridge=0.01, cap=500, refine_steps=300, tail_fraction=0.01)
  assert second == [], second
  _check_24(res, k)
  # The progress bar (a host callback inside the compiled loops, its interval traced) adds no compile either.
  with _count_compiles() as third:
    prune_kernel(k, h, lam0=0.01, beta=1.2, progress=True)
    res = prune_kernel(k, h, lam0=0.02, beta=1.3, progress=5)
  assert third == [], third
  _check_24(res, k)


def test_progress_bar_updates(monkeypatch):
  bars = []

  class FakeBar:

    def __init__(self, total, desc, leave):
      self.total, self.desc, self.n, self.postfix, self.closed = total, desc, 0, {}, False
      bars.append(self)

    def update(self, k):
      self.n += k

    def set_postfix(self, refresh=True, **kw):
      self.postfix = kw

    def close(self):
      self.closed = True

  import tqdm.auto  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
  k, h = _small()
  res = prune_kernel(k, h, lam0=0.01, beta=1.1, progress=4, refine="gd", refine_steps=30)
  prox_bar, refine_bar = bars
  assert prox_bar.n == res.info.iterations // 4 * 4 > 0 and "groups_left" in prox_bar.postfix
  assert refine_bar.n == 28 and refine_bar.total == 30
  assert prox_bar.closed and refine_bar.closed


@pytest.mark.parametrize("kernel_shape,hessian_shape,kw,err", [
    ((32, 8), (16, 16), {}, "does not match"),
    ((30, 8), (30, 30), {}, "not divisible"),
    ((32, 8), (32, 16), {}, "square"),
    ((32, 8, 2), (32, 32), {}, "2-D"),
    ((32, 8), (32, 32), dict(n=1, m=4), "2:4 only"),
    ((32, 8), (32, 32), dict(method="foo"), "unknown method"),
    ((32, 8), (32, 32), dict(refine="adam"), "refine must be"),
    ((32, 8), (32, 32), dict(lam0=-1.0), "lam0"),
])
def test_errors(kernel_shape, hessian_shape, kw, err):
  with pytest.raises(ValueError, match=err):
    prune_kernel(np.ones(kernel_shape, np.float32), np.eye(hessian_shape[0], hessian_shape[1], dtype=np.float32), **kw)


def test_errors_nan_and_options():
  k, h = _small()
  with pytest.raises(ValueError, match="finite"):
    prune_kernel(np.where(np.arange(SHAPE[0])[:, None] == 3, np.nan, k), h)
  with pytest.raises(ValueError, match="finite"):
    prune_kernel(k, np.where(np.eye(SHAPE[0]) > 0, np.inf, h))
  with pytest.raises(ValueError, match="method 'wanda' has no option 'lam0'"):
    prune_kernel(k, h, "wanda", lam0=0.1)
  with pytest.raises(ValueError, match="method 'wanda' has no option 'damp'"):
    prune_kernel(k, h, "wanda", damp=0.01)
  with pytest.raises(ValueError, match="without a refinement"):
    prune_kernel(k, h, "magnitude", refine_steps=10)
  with pytest.raises(ValueError, match="either a PruneConfig"):
    prune_kernel(k, h, PruneConfig(), refine="gd")


def test_the_prox_schedule_is_set_once_and_resolved_in_the_report():
  assert ProxConfig().start == ("lam0_relative", 1e-4) and ProxConfig().growth == ("budget", 150)
  assert ProxConfig().pacing == 0.01 and ProxConfig(beta=1.1).pacing == 0.0 and ProxConfig(pace=0.0).pacing == 0.0
  assert ProxConfig.paper().pacing == 0.0 and ProxConfig(lam0=0.05, budget=40).pacing == 0.01
  assert ProxConfig(lam0=0.05).start == ("lam0", 0.05) and ProxConfig(beta=1.1).growth == ("beta", 1.1)
  assert ProxConfig.paper() == ProxConfig(lam0=0.01, beta=1.01, accelerate=False, column_stop=False, pace=0.0,
                                          grad_dtype="float32")
  assert ProxConfig().grad_dtype == "bfloat16" and ProxConfig.paper(grad_dtype="bfloat16").grad_dtype == "bfloat16"
  for bad, needle in (({"lam0": 0.1, "lam0_relative": 0.1}, "not both"), ({"beta": 1.1, "budget": 10}, "not both"),
                      ({"accelerate": 1}, "True or False"), ({"pace": -0.1}, "pace must be >= 0"),
                      ({"pace": 1.0}, "pace must be < 1"), ({"grad_dtype": "float16"}, "grad_dtype must be one of")):
    with pytest.raises(ValueError, match=needle):
      ProxConfig(**bad)
  k, h = _small()
  res = prune_kernel(k, h, "prox", refine=None)  # the default: λ₀ = 1e-4·Lκ, β for 150 iterations, paced
  s = res.info.schedule
  assert s.lam0 == pytest.approx(1e-4 * s.lipschitz * s.kappa, rel=1e-5)
  assert s.beta == pytest.approx((s.lipschitz * s.kappa / s.lam0) ** (1 / 150), rel=1e-5)
  assert 100 <= res.info.iterations <= 270 and s.estimated_iterations in (150, 151) and not res.info.cap_hit


def test_the_certificate_changes_no_iterate(monkeypatch):
  """The loop's 2-sparse certificate (proxjax.core.prox.prox_24_listed: closed form for certified groups, the
  Newton solve gathered in chunks for the rest, the list carried) against the loop without it, on the toy layer:
  the same mask, iterations and losses (1e-5: the two compiled Newton programs round differently under fast math,
  and the paced default's trajectory carries that into the loss at ~1e-6). Two compiles of the loop: without the
  certificate (the toy's default: it is on only from CERTIFY.min_groups groups; shared with the toy tests), and with
  it in chunks of 32 groups (several chunks per iteration, the list rebuilt and reused)."""
  k, h = _toy(1)
  assert "capacity" in pruner.prox_loop_statics(ProxConfig(), (576, 192))  # on by default for real layers
  assert "capacity" not in pruner.prox_loop_statics(ProxConfig(), k.shape)  # off below min_groups
  runs = {}
  for name, certify in (("off", pruner.Certify(capacity=0.0)),
                        ("on", pruner.Certify(capacity=0.5, chunk=32, min_groups=0))):
    monkeypatch.setattr(pruner, "CERTIFY", certify)
    runs[name] = prune_kernel(k, h, grad_dtype="float32")  # float32: a bfloat16 gradient would round the two
    # solves' last-bit differences to 2⁻⁸ of an operand, and this compares the two up to rounding
  on, off = runs["on"], runs["off"]
  np.testing.assert_array_equal(np.asarray(on.mask), np.asarray(off.mask))
  assert on.info.iterations == off.info.iterations
  assert on.info.loss_before_refine == pytest.approx(off.info.loss_before_refine, rel=1e-5, abs=1e-9)
  assert on.info.loss_after_refine == pytest.approx(off.info.loss_after_refine, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("pace", [0.0, 0.02])
def test_column_compaction_changes_no_iterate(monkeypatch, pace):
  """The loop narrowed to its open columns (pruner.COMPACT: on by default only from 16384 groups; here forced on the
  toy layer, widths 32 → 16 → 8) against the loop that keeps every column: a stopped column keeps its iterate either
  way, so the same mask, iterations and losses (1e-6; the narrower matmuls may round differently). With ``pace`` the
  schedule's state (its exponent and the count of open groups) goes on across the narrowing too."""
  k, h = _toy(1)
  assert pruner.compaction_widths(ProxConfig(), (576, 576)) == [256, 128, 64, 32]
  assert pruner.compaction_widths(ProxConfig(), k.shape) == []  # off below min_groups
  assert pruner.compaction_widths(ProxConfig(column_stop=False), (576, 576)) == []
  ran = []
  run = pruner._run
  monkeypatch.setattr(pruner, "_run", lambda name, mesh, shape, *a, **kw: (ran.append((name, shape)),
                                                                           run(name, mesh, shape, *a, **kw))[1])
  runs = {}
  for name, compact in (("off", pruner.Compact(factor=0.0)), ("on", pruner.Compact(min_width=8, min_groups=0))):
    monkeypatch.setattr(pruner, "COMPACT", compact)
    runs[name] = prune_kernel(k, h, pace=pace, grad_dtype="float32")  # float32: as in the test above
  assert ("prox_resume", (64, 16)) in ran and ("prox_resume", (64, 8)) in ran
  on, off = runs["on"], runs["off"]
  np.testing.assert_array_equal(np.asarray(on.mask), np.asarray(off.mask))
  assert on.info.iterations == off.info.iterations
  assert on.info.loss_before_refine == pytest.approx(off.info.loss_before_refine, rel=1e-6, abs=1e-9)
  assert on.info.loss_after_refine == pytest.approx(off.info.loss_after_refine, rel=1e-6, abs=1e-9)
