r"""Pruning cost at LLaMA-2 scale: one 7B-, 13B- or 70B-shaped decoder block, every method, on one accelerator.

Answers, for one model size per invocation (the GPU machine allows 10 minutes per command), with ratios measured side
by side in one run:

1. **Time per method and linear**: magnitude, Wanda, SparseGPT, Wanda + CG, SparseGPT + CG, prox with an iteration
   budget (``prox-budget``, ``--budget 300``) + CG, and prox with the paper's schedule (``prox``: λ₀ = 0.01,
   β = 1.01) + CG, each one call of ``proxjax.prune_kernel``. Reported: the wall time of a timed call after a separate
   warm-up call (``--warmup run``; the prox warm-up runs ``cap=1, refine_steps=1``, both traced, so it compiles the
   same programs) or of one call minus the compile time JAX reports (``--warmup subtract``: saves one setup, i.e. one
   ``eigvalsh`` of ``H̃``, per run); the compile time from JAX's compile events; prox iterations and the schedule's
   estimate; CG iterations; the relative local loss ``tr(ΔᵀHΔ)/tr(K₀ᵀHK₀)`` before and after refinement; memory.
2. **Memory**: on a GPU, ``memory_stats()["peak_bytes_in_use"]``. JAX cannot reset it, so it is the process-wide peak
   so far: each run records the peak before and after it and the rise (no rise = this run peaked at or below an
   earlier one); the final peak bounds every run. On CPU (no memory stats) the compiled ``memory_analysis()`` of the
   pieces ``prune_kernel`` ran (arguments + outputs + temporaries of the largest; ``--memory-analysis`` adds it on a
   GPU).
3. **Prox step vs the matmul roofline**: one iteration of ``prune_kernel``'s own compiled prox loop (``H̃(Ṽ − K̃₀)`` at
   ``--precision``, ``prox_24`` over all groups, the count of groups not yet 2:4, the loop's overhead; timed as
   ``(t(cap=1+N) − t(cap=1))/N`` at a constant late-schedule λ) against the bare float32 matmul ``H̃ @ Ṽ`` of the
   same shape and precision: **step / matmul**, and the matmul's TFLOP/s as a fraction of the assumed peak at that
   precision (H100/H200 SXM dense: bf16 989, TF32 495, FP32 without tensor cores 67 TFLOP/s; HIGHEST float32 is
   compared with FP32, DEFAULT with TF32). Also the setup time (preconditioning, ``λ_max(H̃)`` by ``eigvalsh``, κ).
4. **Calibration**: ``H = XXᵀ/n`` accumulated with ``proxjax.pruning.calibration`` (float32, HIGHEST) from bf16 chunks of
   ``--chunk`` tokens generated on the device, inside one jitted ``lax.fori_loop``; its time with the generator's own
   time (timed alone) subtracted, its TFLOP/s counting ``2·n·d²``, and the ratio to the bare HIGHEST ``XᵀX`` matmul of
   one chunk.
5. **Extrapolation**: per block = Σ over the 7 linears of the measured prune time (linears with the same input and
   shape are timed once and multiplied: q/k/v ×3 for 7B/13B, k/v ×2 for 70B, gate/up ×2) + the H accumulation of the
   block's 4 distinct inputs + 2 forward passes over the calibration tokens (dense capture, pruned propagation)
   estimated as their matmul FLOPs (7 linears + full, non-causal attention ``4·seq·d_attn`` per token) over the bf16
   matmul rate measured here; whole model = layers × per block. Goals: 7B prox + refinement ≤ 30 min on one H100; a
   70B block fits in 80 GB. A prox run skipped by ``--deadline`` contributes its predicted time (``~``: setup +
   schedule estimate × measured step + 50 CG matmuls).

Synthetic data (no checkpoint can be sent to the GPU machine), all generated on the device and deterministic from
``--seed``:

* **Weights**: ``N(0, 0.02²)`` in bf16; ``--weights student``: Student-t with 4 degrees of freedom rescaled to the same
  std (heavier tails).
* **Activations**: ``x = c ⊙ (z A + ν ε)``, ``z ~ N(0, I_r)``, ``A = diag(σ) G`` with ``G`` an ``r × d`` standard
  Gaussian: rank ``r = d/16`` with a decaying spectrum ``σ_i ∝ (i+1)^{-0.5}``, ``Σσ² = 1`` (every channel has
  variance ≈ 1); isotropic noise ``ν = 0.3`` (a 9 % floor); outlier channels ``c_j ~ U(20, 100)`` on 0.5 % of the
  channels, ``c_j = 1`` elsewhere. ``H̃ = diag(H)^{-1/2} H diag(H)^{-1/2}`` is then far from the identity
  (``λ_max(H̃) ≈ d·σ₀²/(1 + ν²)``: 30–70 measured at d = 128–344, ~600 expected at d = 4096), so the paper schedule
  needs ~1050–1250 iterations at tiny sizes (~1600 estimated at d = 4096), like SmolLM2's real layers (1072–1799);
  i.i.d. Gaussian inputs would give ``H̃ ≈ I`` and an early stop. One
  generator per block input (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_act``); chunk ``i`` comes from
  ``fold_in(key, i)``, so the token matrix never exists. Caveat: outliers ×20–100 dominate ``tr(K₀ᵀHK₀)`` and every
  method keeps them, so the relative losses are ~10× smaller than on real layers; ``--outlier-frac 0`` gives losses
  like SmolLM2's (d = 512: Wanda 0.12, SparseGPT 0.018, Wanda + CG 0.0125, prox(budget 100) + CG 0.0121). ν = 0.1
  made SparseGPT and CG unrealistically exact (low-rank H), ν = 1 shrinks ``λ_max(H̃)``.
* **Tokens**: ``--tokens`` per linear input (default 262,144 = the paper's 128 × 2048 sequences; ``--tokens 2097152``
  for the 2 M of the issue), rounded down to a multiple of ``--chunk``; the number used is printed and stored.

Run from the repository root. CPU check (``tiny``: hidden 128, intermediate 344, 2 heads of 64, 2 layers; the run is
compile-bound: proxjax compiles ~8 programs per distinct kernel shape, 3 shapes here, 40–50 s of a 60–80 s run on the
shared 2-core machine)::

  python benchmarks/scale_blocks.py --model tiny --tokens 4096
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_blocks.py --model tiny --tokens 4096 \
      --mesh 8 --methods wanda prox

On one H100/H200. proxjax is not installed there, so ``PYTHONPATH=.``; results go to ``$OUT``. The machine allows 10
minutes per command and 30 minutes in all, machine start included. ``--deadline 540`` starts no run after 9 minutes
and skips a prox run whose prediction does not fit (recording the prediction); the JSON is rewritten after every run,
so a killed command still leaves its results. Times below are estimates from FLOP counts (HIGHEST float32 matmuls at
~50 TFLOP/s, ~1300–1700 paper-schedule iterations, compiles ~1–2 min per model), not measurements: the ``[t]``
prefix of every printed line shows where a run really is. In order of priority::

  # 7B, all methods on the 4 distinct linears q o gate down (~34 ms per prox iteration over the four): ~4-6 min
  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/scale_blocks.py --model 7b --deadline 540 --out $OUT/7b.json
  # 70B (GQA: k = v 8192->1024), HIGHEST: ~0.4 s per prox iteration over q k o gate down (down 28672->8192 is
  # 0.27 s of it), so the paper schedule (~1700 iterations) cannot fit: it is skipped with its predicted time
  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/scale_blocks.py --model 70b --warmup subtract \
      --methods wanda prox-budget sparsegpt+cg prox --deadline 540 --out $OUT/70b.json
  # 13B (~66 ms per prox iteration over q o gate down): ~5-7 min
  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/scale_blocks.py --model 13b --deadline 540 --out $OUT/13b.json
  # 70B paper schedule with TF32 matmuls in the loop (DEFAULT precision; H and eigvalsh stay float32), H from the
  # issue's 2 M tokens (~90 s of HIGHEST XᵀX for the 4 inputs)
  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/scale_blocks.py --model 70b --tokens 2097152 --warmup subtract \
      --methods prox --precision default --deadline 540 --out $OUT/70b_tf32.json
  # afterwards, on any machine: combine JSONs of one model (runs of a later file replace those of an earlier one)
  python3 benchmarks/scale_blocks.py --merge 70b.json 70b_tf32.json

The four GPU commands together are ~25–30 minutes with the machine start: more than one session may be needed (the
machine stays warm only 30 s between calls). Unknown until measured: XLA's compile times on the GPU, and
``eigvalsh`` of a 28672 × 28672 ``H̃`` (JAX's eigvalsh runs a full ``syevd`` with eigenvectors), which every prox call
on 70B down_proj repeats; the ``setup s`` column shows it.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # JAX's default preallocation is 75 % of the GPU

import argparse
import functools
import json
import math
import platform
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import proxjax
from proxjax.pruning import calibration
from proxjax.pruning import pruner
from proxjax.pruning import refine
from proxjax.core import sharding
from proxjax.pruning.methods import ProxConfig

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32

MODELS = {  # hidden, intermediate, heads, kv heads, head dim, layers
    "tiny": dict(hidden=128, inter=344, heads=2, kv_heads=2, head_dim=64, layers=2),  # CPU smoke test
    "7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128, layers=32),
    "13b": dict(hidden=5120, inter=13824, heads=40, kv_heads=40, head_dim=128, layers=40),
    "70b": dict(hidden=8192, inter=28672, heads=64, kv_heads=8, head_dim=128, layers=80),
}
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")

# label -> (prune_kernel method, refine, prox schedule: "paper" | "budget" | None)
METHODS = {
    "magnitude": ("magnitude", None, None),
    "wanda": ("wanda", None, None),
    "sparsegpt": ("sparsegpt", None, None),
    "wanda+cg": ("wanda", "cg", None),
    "sparsegpt+cg": ("sparsegpt", "cg", None),
    "prox-budget": ("prox", "cg", "budget"),
    "prox": ("prox", "cg", "paper"),
    "prox-default": ("prox", "cg", "default"),  # the library's default: FISTA, budget 150 paced, relative λ₀
}

# Dense peak TFLOP/s by device kind (NVIDIA data sheets, SXM parts): bf16 tensor core, TF32 tensor core, FP32 without
# tensor cores. A float32 matmul at Precision.HIGHEST is plain FP32 (cuBLAS SGEMM); DEFAULT allows TF32.
_PEAKS = (
    ("H200", "H200 SXM", 989.0, 494.7, 66.9),
    ("H100 PCIe", "H100 PCIe", 756.0, 378.0, 51.2),
    ("H100", "H100 SXM", 989.0, 494.7, 66.9),
    ("A100", "A100 SXM", 312.0, 156.0, 19.5),
)


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


_START = time.perf_counter()


def log(*args: Any) -> None:
  """Prints at once (the GPU machine returns only what was printed before a timeout), with the elapsed time."""
  print(f"[{time.perf_counter() - _START:6.1f}s]", *args, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes


def linears(cfg: dict[str, int]) -> dict[str, dict[str, Any]]:
  """The 7 linears of a block: ``name -> {d_in, d_out, input}`` (Flax kernel layout ``(d_in, d_out)``)."""
  h, attn, kv = cfg["hidden"], cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
  shapes = {"q": (h, attn, "attn_in"), "k": (h, kv, "attn_in"), "v": (h, kv, "attn_in"), "o": (attn, h, "attn_out"),
            "gate": (h, cfg["inter"], "mlp_in"), "up": (h, cfg["inter"], "mlp_in"),
            "down": (cfg["inter"], h, "mlp_act")}
  out = {}
  for name, (d_in, d_out, inp) in shapes.items():
    key = (inp, d_in, d_out)
    same = [n for n, s in shapes.items() if (s[2], s[0], s[1]) == key]
    out[name] = dict(d_in=d_in, d_out=d_out, input=inp, twins=same, multiplicity=len(same))
  return out


def representatives(lin: dict[str, dict[str, Any]]) -> list[str]:
  """One linear per (input, shape): the ones whose timing stands for their twins."""
  return [n for n in LINEARS if lin[n]["twins"][0] == n]


def device_peaks() -> dict[str, float] | None:
  kind = jax.devices()[0].device_kind
  for key, name, bf16, tf32, fp32 in _PEAKS:
    if key in kind:
      return dict(name=name, bf16=bf16, tf32=tf32, fp32=fp32)
  return None


def peak_for(peaks: dict[str, float] | None, precision: str, dtype: str = "float32") -> tuple[str, float | None]:
  """The peak that applies to a matmul of ``dtype`` at ``precision``."""
  if dtype == "bfloat16":
    key = "bf16"
  else:
    key = "fp32" if precision == "highest" else "tf32"
  return key, (peaks or {}).get(key)


# ---------------------------------------------------------------------------------------------------------------------
# Timing, compile time and memory


_COMPILE_SECONDS = [0.0]


def _on_event(event: str, duration: float, **_: Any) -> None:
  if event.startswith("/jax/core/compile/"):
    _COMPILE_SECONDS[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def best_time(fn: Callable[[], Any], repeats: int, min_time: float = 0.05, warm: bool = True) -> float:
  """Best of ``repeats`` after a warm-up call (unless ``warm=False``: the caller just ran it); calls shorter than
  ``min_time`` are batched ``n`` at a time."""
  if warm:
    jax.block_until_ready(fn())
  t = time.perf_counter()
  jax.block_until_ready(fn())
  once = time.perf_counter() - t
  n = max(1, math.ceil(min_time / max(once, 1e-7))) if once < min_time else 1
  times = [once] if n == 1 else []
  for _ in range(repeats - len(times)):
    t = time.perf_counter()
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / n)
  return min(times)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """``(result, seconds)`` of one call (already compiled); best of ``repeats`` if a call takes under a second."""
  best, out = math.inf, None
  for i in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
    if i == 0 and best >= 1.0:
      break
  return out, best


def memory() -> dict[str, int] | None:
  """``bytes_in_use``, ``peak_bytes_in_use`` and ``bytes_limit`` (max over the devices in use), or ``None`` (CPU)."""
  out: dict[str, int] = {}
  for dev in jax.devices():
    try:
      stats = dev.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if not stats:
      return None
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
      if key in stats:
        out[key] = max(out.get(key, 0), int(stats[key]))
  return out


def gib(x: float | None) -> str:
  """Bytes as GiB (MiB below 1 GiB)."""
  if x is None:
    return "n/a"
  return f"{x / 2**30:.2f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def piece_memory(method: str, refine_: str | None, shape: tuple[int, int], precision: str, mesh: Any) -> int | None:
  """Largest ``arguments + outputs + temporaries − aliased`` bytes over the compiled pieces ``prune_kernel`` runs for
  this method (per device on a mesh). Uses proxjax's private piece table: ``None`` if that is not available. The
  executables are those the runs compiled (jit's cache), so this compiles nothing new."""
  d_in, d_out = shape
  prec = refine.as_precision(precision)  # pylint: disable=protected-access
  k, h = _sds(shape, jnp.bfloat16), _sds((d_in, d_in), _F32)
  kf, mask, s = _sds(shape, _F32), _sds(shape, jnp.bool_), _sds((), _F32)
  i32 = _sds((), jnp.int32)
  vec = _sds((d_in,), _F32)
  pre = refine.Preconditioned(vec, vec, h, _sds((d_in,), jnp.bool_), s)
  pieces = []
  if method == "prox":
    pieces.append(("setup", (k, h, s), dict(lipschitz=True)))
    pieces.append(("prox_loop", (kf, h, s, s, s, s, i32, i32, i32, i32, s), dict(loop="while", scan_length=None,
                                                                                 precision=prec)))
  else:
    pieces.append(("setup", (k, h, s), dict(lipschitz=refine_ == "gd")))
    pieces.append(("baseline", (k, h, s), dict(method=method, n=2, m=4, blocksize=128)))
  pieces.append(("finish", (kf, mask, kf, pre, s, i32, s, i32), dict(refine=refine_, precision=prec,
                                                                      out_dtype=jnp.dtype(jnp.bfloat16))))
  best = None
  try:
    for name, args, statics in pieces:
      fn = pruner.compiled_piece(name, mesh, shape, tuple(sorted(statics.items())))  # pylint: disable=protected-access
      fn = getattr(fn, "fast" if jax.default_backend() == "cpu" else "strict", fn)
      ma = fn.lower(*args).compile().memory_analysis()
      if ma is None:
        return None
      total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
      best = max(best or 0, int(total))
  except Exception as err:  # pylint: disable=broad-except
    log(f"    (memory_analysis unavailable: {type(err).__name__}: {err})")
    return None
  return best


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data, generated on the device


def _seed(base: int, name: str) -> int:
  return (base * 1_000_003 + zlib.crc32(name.encode())) % 2**31


@functools.partial(jax.jit, static_argnames=("shape", "dist"))
def random_kernel(key: jax.Array, shape: tuple[int, int], dist: str, std: float) -> jax.Array:
  """Random bf16 kernel: N(0, std²), or Student-t (4 degrees of freedom, variance 2) rescaled to std."""
  if dist == "normal":
    w = jax.random.normal(key, shape, _F32)
  else:
    w = jax.random.t(key, 4.0, shape, _F32) / math.sqrt(2.0)
  return (std * w).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("d", "rank", "n_out"))
def generator(key: jax.Array, d: int, rank: int, decay: float, n_out: int, outlier_lo: float,
              outlier_hi: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(A, c, key)`` of the structured activation generator: ``A = diag(σ) G`` bf16 ``(rank, d)``, channel scales ``c``
  ``(d,)`` with ``n_out`` channels in ``U(lo, hi)``, and the chunk key."""
  k_a, k_o, k_c, k_z = jax.random.split(key, 4)
  sigma = (1.0 + jnp.arange(rank, dtype=_F32)) ** (-decay)
  sigma = sigma / jnp.sqrt(jnp.sum(sigma * sigma))
  a = (sigma[:, None] * jax.random.normal(k_a, (rank, d), _F32)).astype(jnp.bfloat16)
  scale = jnp.ones((d,), _F32)
  if n_out:
    idx = jax.random.choice(k_o, d, (n_out,), replace=False)
    scale = scale.at[idx].set(jax.random.uniform(k_c, (n_out,), _F32, outlier_lo, outlier_hi))
  return a, scale, k_z


def _chunk(a: jax.Array, scale: jax.Array, key: jax.Array, i: jax.Array, chunk: int, noise: float,
           spec: Any) -> jax.Array:
  """Chunk ``i`` of the activations: bf16 ``(chunk, d)``."""
  k1, k2 = jax.random.split(jax.random.fold_in(key, i))
  z = jax.random.normal(k1, (chunk, a.shape[0]), jnp.bfloat16)
  x = jnp.matmul(z, a, preferred_element_type=_F32) + noise * jax.random.normal(k2, (chunk, a.shape[1]), _F32)
  x = (scale * x).astype(jnp.bfloat16)
  return x if spec is None else lax.with_sharding_constraint(x, spec)


@functools.lru_cache(maxsize=None)
def accumulators(chunk: int, noise: float, mesh: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """Jitted ``(accumulate, generate_only)``; the chunk count is traced (one compile per ``d``). On a mesh the tokens
  of each chunk are split over every device and the state is replicated (XLA all-reduces ``XᵀX``)."""
  spec = None if mesh is None else sharding.activation_sharding(mesh, (chunk, 1))

  def accumulate(a, scale, key, n_chunks):
    body = lambda i, st: calibration.hessian_update(st, _chunk(a, scale, key, i, chunk, noise, spec))
    return lax.fori_loop(0, n_chunks, body, calibration.hessian_init(a.shape[1]))

  def generate_only(a, scale, key, n_chunks):  # the same chunks, reduced by a cheap elementwise pass
    body = lambda i, acc: acc + jnp.sum(jnp.square(_chunk(a, scale, key, i, chunk, noise, spec).astype(_F32)), 0)
    return lax.fori_loop(0, n_chunks, body, jnp.zeros((a.shape[1],), _F32))

  if mesh is None:
    return jax.jit(accumulate), jax.jit(generate_only)
  rep = sharding.replicated(mesh)
  return jax.jit(accumulate, out_shardings=rep), jax.jit(generate_only, out_shardings=rep)


# ---------------------------------------------------------------------------------------------------------------------
# Measurements


def measure_hessian(name: str, d: int, args: argparse.Namespace, mesh: Any, peaks: Any,
                    compiled_dims: set[int]) -> tuple[jax.Array, dict[str, Any]]:
  """``H`` of one block input, with its accumulation time and rates."""
  rank = max(1, round(d * args.rank_frac))
  n_out = max(1, round(args.outlier_frac * d)) if args.outlier_frac > 0 else 0  # at least 1 if any
  a, scale, key = generator(jax.random.key(_seed(args.seed, "input/" + name)), d, rank, args.decay, n_out,
                            args.outlier_scale[0], args.outlier_scale[1])
  chunk = min(args.chunk, args.tokens)
  n_chunks = args.tokens // chunk
  acc, gen = accumulators(chunk, args.noise, mesh)
  rec: dict[str, Any] = dict(d=d, rank=rank, tokens=n_chunks * chunk, chunk=chunk)
  if d not in compiled_dims:
    c0, t = _COMPILE_SECONDS[0], time.perf_counter()
    jax.block_until_ready(acc(a, scale, key, 1))
    jax.block_until_ready(gen(a, scale, key, 1))
    rec["warmup_s"], rec["compile_s"] = time.perf_counter() - t, _COMPILE_SECONDS[0] - c0
    compiled_dims.add(d)
  state, rec["seconds"] = timed(lambda: acc(a, scale, key, n_chunks), args.repeats)
  _, rec["generate_s"] = timed(lambda: gen(a, scale, key, n_chunks), args.repeats)
  hess = calibration.hessian_from_state(state)
  flops = 2.0 * rec["tokens"] * d * d
  xf = random_kernel(jax.random.key(1), (chunk, d), "normal", 1.0).astype(_F32)  # one chunk of random data
  xtx = jax.jit(lambda v: jnp.matmul(v.T, v, precision=_HI))
  t_mm = best_time(lambda: xtx(xf), args.repeats)
  acc_s = rec["seconds"] - rec["generate_s"]
  rec["generation_subtracted"] = acc_s >= 0.1 * rec["seconds"]  # else too noisy to subtract: count it in
  acc_s = acc_s if rec["generation_subtracted"] else rec["seconds"]
  rec.update(flops=flops, tflops=flops / acc_s / 1e12, tflops_with_generation=flops / rec["seconds"] / 1e12,
             matmul_tflops=2.0 * chunk * d * d / t_mm / 1e12)
  rec["vs_matmul"] = rec["tflops"] / rec["matmul_tflops"]
  _, peak = peak_for(peaks, "highest")
  rec["vs_peak"] = None if peak is None else rec["tflops"] / peak
  diag = jnp.diagonal(hess)
  rec["diag_max_over_median"] = float(jnp.max(diag) / jnp.median(diag))
  return hess, rec


def measure_setup_and_step(kernel: jax.Array, hess: jax.Array, args: argparse.Namespace, mesh: Any,
                           peaks: Any) -> dict[str, Any]:
  """``prune_kernel``'s setup (preconditioning, ``λ_max`` by ``eigvalsh``, ``κ``) and one prox-gradient iteration vs
  the bare matmul of the same shape, timed side by side.

  The iteration is timed on ``prune_kernel``'s own compiled prox loop (the executable the prox runs use, so nothing
  extra is compiled): ``(t(cap = 1 + N) − t(cap = 1)) / N`` at a constant late-schedule ``λ = 0.5·Lκ`` (``β = 1``),
  where many groups are 2-sparse but not all, so the loop runs all ``N`` iterations. One iteration is exactly what
  the paper schedule repeats: ``H̃(Ṽ − K̃₀)`` at ``--precision``, ``prox_24`` over all groups, the count of groups
  not yet 2:4, and the while loop's own overhead."""
  d_in, d_out = kernel.shape
  precision = refine.as_precision(args.precision)  # pylint: disable=protected-access
  if mesh is not None:
    kernel = jax.device_put(kernel, sharding.kernel_sharding(mesh, kernel.shape))
    hess = jax.device_put(hess, sharding.replicated(mesh))
  constants = lambda: pruner._constants(kernel, hess, 0.99, 0.0, mesh=mesh)  # pylint: disable=protected-access
  c0, t = _COMPILE_SECONDS[0], time.perf_counter()
  pre, k0t, lip, kappa = constants()
  warm, compile_s = time.perf_counter() - t, _COMPILE_SECONDS[0] - c0
  if args.warmup == "run":
    t = time.perf_counter()
    pre, k0t, lip, kappa = constants()
    setup_s = time.perf_counter() - t
  else:
    setup_s = warm - compile_s
  f32 = lambda x: jnp.asarray(x, _F32)
  lam = f32(0.5 * lip * kappa if kappa > 0 else args.lam0)

  def loop(cap: int) -> Any:
    # pylint: disable-next=protected-access
    return pruner._run("prox_loop", mesh, kernel.shape, k0t, pre.hessian, f32(1.0 / lip), f32(0.0), lam, f32(1.0),
                       jnp.int32(0), jnp.int32(cap), jnp.int32(0), jnp.int32(0), f32(0.0), loop="while",
                       scan_length=None, precision=precision)

  c0, t = _COMPILE_SECONDS[0], time.perf_counter()
  jax.block_until_ready(loop(1))
  loop_compile_s = _COMPILE_SECONDS[0] - c0
  t_one = best_time(lambda: loop(1), args.repeats)
  n = int(min(1000, max(10, math.ceil(0.2 / max(t_one, 1e-6)))))  # ≥ 0.2 s of iterations (t_one ≥ one iteration)
  ran = int(loop(1 + n)[3])  # also the warm-up of the timing below
  t_many = best_time(lambda: loop(1 + n), args.repeats, warm=False)
  t_step = max(t_many - t_one, 1e-9) / max(ran - 1, 1)
  matmul = jax.jit(lambda ht, v: jnp.matmul(ht, v, precision=precision))
  t_mm = best_time(lambda: matmul(pre.hessian, k0t), args.repeats)
  flops = 2.0 * d_in * d_in * d_out
  key, peak = peak_for(peaks, args.precision)
  estimate = pruner._estimate(lip, kappa, args.lam0, args.beta)  # pylint: disable=protected-access
  rec = dict(setup_s=setup_s, setup_warmup_s=warm, setup_compile_s=compile_s, loop_compile_s=loop_compile_s,
             lipschitz=lip, kappa=kappa, estimated_iterations_paper=estimate,
             matmul_s=t_mm, step_s=t_step, step_iterations_timed=ran - 1, step_over_matmul=t_step / t_mm,
             rest_share=max(t_step - t_mm, 0.0) / t_step, matmul_tflops=flops / t_mm / 1e12, peak_key=key,
             peak_tflops=peak)
  rec["matmul_vs_peak"] = None if peak is None else rec["matmul_tflops"] / peak
  return rec


def predicted_prox_seconds(step: dict[str, Any], iterations: int) -> float:
  """Setup + iterations × step + 50 CG iterations (one matmul each; CG used 20–60 on real layers)."""
  return step["setup_s"] + iterations * step["step_s"] + 50 * step["matmul_s"]


def run_method(label: str, kernel: jax.Array, hess: jax.Array, args: argparse.Namespace, mesh: Any,
               step: dict[str, Any], remaining: float | None) -> dict[str, Any]:
  method, refine_, schedule = METHODS[label]
  opts: dict[str, Any] = dict(precision=args.precision)
  rec: dict[str, Any] = dict(method=method, refine=refine_, precision=args.precision)
  estimate = needed = None
  if method == "prox" and schedule == "default":
    opts.update(cap=args.cap)
    estimate = ProxConfig.DEFAULT_BUDGET
  elif method == "prox":
    opts.update(cap=args.cap, accelerate=False)  # the plain prox-gradient of the paper
    if args.lam0_relative is not None:
      opts["lam0_relative"] = args.lam0_relative
    else:
      opts["lam0"] = args.lam0
    if schedule == "budget":
      opts.update(budget=args.budget, pace=0.0)  # the geometric schedule λ₀βᵏ
      estimate = args.budget
    else:
      opts["beta"] = args.beta
      estimate = step["estimated_iterations_paper"] if args.lam0_relative is None else None
    if estimate is not None:
      rec["predicted_s"] = predicted_prox_seconds(step, min(estimate, args.cap))
      # what this invocation would spend: a warm-up run repeats the setup (eigvalsh) and one iteration
      needed = rec["predicted_s"] + (step["setup_s"] + step["step_s"] if args.warmup == "run" else 0.0)
  if remaining is not None and (remaining <= 0 or (needed is not None and needed > remaining)):
    rec["skipped"] = f"deadline ({max(remaining, 0):.0f} s left)"
    return rec
  if args.warmup == "run":
    warm_opts = dict(opts)
    if method == "prox":
      warm_opts["cap"] = 1  # traced: same executables, one iteration
    if refine_ is not None:
      warm_opts["refine_steps"] = 1
    c0, t = _COMPILE_SECONDS[0], time.perf_counter()
    res = proxjax.prune_kernel(kernel, hess, method, refine=refine_, mesh=mesh, **warm_opts)
    jax.block_until_ready(res.kernel)
    rec["warmup_s"], rec["compile_s"] = time.perf_counter() - t, _COMPILE_SECONDS[0] - c0
    del res
  before = memory()
  c0, t = _COMPILE_SECONDS[0], time.perf_counter()
  res = proxjax.prune_kernel(kernel, hess, method, refine=refine_, mesh=mesh, **opts)
  jax.block_until_ready(res.kernel)
  rec["seconds"] = time.perf_counter() - t
  compiled = _COMPILE_SECONDS[0] - c0  # 0 after a warm-up run
  if args.warmup == "subtract":
    rec.update(warmup_s=0.0, compile_s=compiled, seconds=rec["seconds"] - compiled)
  else:
    rec["recompile_s"] = compiled
  after = memory()
  info = res.info
  rec.update(iterations=info.iterations, cap_hit=info.cap_hit, groups_projected=info.groups_projected,
             refine_steps=info.refine_steps, loss_before_refine=info.loss_before_refine,
             loss_after_refine=info.loss_after_refine, is_24=bool(proxjax.is_nm(res.kernel)))
  if info.schedule is not None:
    rec.update(lam0=info.schedule.lam0, beta=info.schedule.beta,
               estimated_iterations=info.schedule.estimated_iterations)
  if before is not None and after is not None:
    rec.update(bytes_in_use_before=before["bytes_in_use"], peak_before=before["peak_bytes_in_use"],
               peak_after=after["peak_bytes_in_use"], bytes_limit=after.get("bytes_limit"),
               peak_rise=after["peak_bytes_in_use"] - before["peak_bytes_in_use"])
  if before is None or args.memory_analysis:
    c0 = _COMPILE_SECONDS[0]
    rec["compiled_bytes"] = piece_memory(method, refine_, tuple(kernel.shape), args.precision, mesh)
    rec["memory_analysis_compile_s"] = _COMPILE_SECONDS[0] - c0
  del res
  return rec


# ---------------------------------------------------------------------------------------------------------------------
# Extrapolation and report


def bf16_rate(m: int, k: int, n: int, repeats: int) -> float:
  """TFLOP/s of a bf16 ``(m, k) @ (k, n)`` matmul on random data (constant operands run faster on GPUs)."""
  x = random_kernel(jax.random.key(2), (m, k), "normal", 1.0)
  w = random_kernel(jax.random.key(3), (k, n), "normal", 0.02)
  return 2.0 * m * k * n / best_time(lambda: jnp.matmul(x, w), repeats) / 1e12


def forward_estimate(cfg: dict[str, int], tokens: int, seqlen: int, bf16_tflops: float) -> dict[str, Any]:
  lin = linears(cfg)
  per_token = 2.0 * sum(v["d_in"] * v["d_out"] for v in lin.values()) + 4.0 * seqlen * cfg["heads"] * cfg["head_dim"]
  flops = 2 * tokens * per_token  # two passes: dense capture + pruned propagation
  return dict(flops=flops, seconds=flops / (bf16_tflops * 1e12), flops_per_token=per_token, seqlen=seqlen)


def block_memory(cfg: dict[str, int], tokens: int) -> float:
  """Bytes a sequential pipeline keeps besides one linear's pruning: the block's bf16 weights and the calibration
  activations entering and leaving the block (bf16, ``tokens × hidden`` each)."""
  weights = sum(v["d_in"] * v["d_out"] for v in linears(cfg).values()) * 2
  return weights + 2 * tokens * cfg["hidden"] * 2


def extrapolate(res: dict[str, Any]) -> dict[str, Any]:
  cfg, lin = res["model"], linears(res["model"])
  inputs = {v["input"]: v["d_in"] for v in lin.values()}
  h_time, h_missing = 0.0, []
  for inp, d in inputs.items():
    rec = res["hessian"].get(inp) or next((r for r in res["hessian"].values() if r["d"] == d), None)
    if rec is None:
      h_missing.append(inp)
    else:
      h_time += rec["seconds"] * res["meta"]["tokens_requested"] / rec["tokens"]
  fwd = res.get("forward", {}).get("seconds")
  out: dict[str, Any] = {}
  labels = [m for m in METHODS if any(k.endswith("/" + m) for k in res["runs"])]
  for label in labels:
    prune, missing, predicted = 0.0, [], []
    for rep in representatives(lin):
      rec = next((res["runs"].get(f"{n}/{label}") for n in lin[rep]["twins"]
                  if "seconds" in res["runs"].get(f"{n}/{label}", {})), None)
      if rec is None:
        rec = next((res["runs"].get(f"{n}/{label}") for n in lin[rep]["twins"]
                    if "predicted_s" in res["runs"].get(f"{n}/{label}", {})), None)
        if rec is None:
          missing.append(rep)
          continue
        predicted.append(rep)
        prune += lin[rep]["multiplicity"] * rec["predicted_s"]
      else:
        prune += lin[rep]["multiplicity"] * rec["seconds"]
    block = prune + h_time + (fwd or 0.0)
    precisions = sorted({r.get("precision", res["meta"]["precision"]) for k, r in res["runs"].items()
                         if k.endswith("/" + label)})
    out[label] = dict(prune_s=prune, hessian_s=h_time, forward_s=fwd, block_s=block, model_s=block * cfg["layers"],
                      missing=missing + [f"H:{m}" for m in h_missing] + ([] if fwd is not None else ["forward"]),
                      predicted=predicted, precisions=precisions)
  return out


def report(res: dict[str, Any]) -> None:
  meta, cfg = res["meta"], res["model"]
  lin = linears(cfg)
  log(f"\n=== {meta['model']} summary: {meta['device']} | jax {meta['jax']} | prune matmul precision "
      f"{meta['precision']} | H: HIGHEST | tokens {meta['tokens_used']:,} per input (requested "
      f"{meta['tokens_requested']:,}) ===")
  log("\nprox-gradient iteration (prune_kernel's loop) vs the bare matmul H̃ @ Ṽ of the same shape and precision "
      "(ratio of times measured in one run; non-matmul = share of the iteration that is not the matmul)")
  log(f"{'linear':>6} {'d_in→d_out':>13} {'step/matmul':>12} {'non-matmul':>10} {'matmul TF/s':>12} "
      f"{'of peak':>8} {'L=λmax(H̃)':>11} {'est. iters':>10} {'setup s':>8} {'compile s':>9}")
  for name, s in res["linears"].items():
    if "step_s" not in s:
      continue
    vs = "n/a" if s["matmul_vs_peak"] is None else f"{100 * s['matmul_vs_peak']:.0f}%"
    shape = f"{s['d_in']}→{s['d_out']}"
    log(f"{name:>6} {shape:>13} {s['step_over_matmul']:12.2f} {100 * s['rest_share']:9.0f}% "
        f"{s['matmul_tflops']:12.2f} {vs:>8} {s['lipschitz']:11.1f} {s['estimated_iterations_paper']:10d} "
        f"{s['setup_s']:8.2f} {s['setup_compile_s'] + s['loop_compile_s']:9.1f}")
  log("\nH accumulation (float32, HIGHEST; generator time subtracted) vs the bare XᵀX matmul of one chunk")
  for inp, h in res["hessian"].items():
    vs = "n/a" if h["vs_peak"] is None else f"{100 * h['vs_peak']:.0f}% of FP32 peak"
    sub = "" if h["generation_subtracted"] else ", counted in: too close to subtract"
    log(f"  {inp:>8} d={h['d']:>6}: {h['seconds']:.2f} s ({h['generate_s']:.2f} s generation{sub}), "
        f"{h['tflops']:.2f} TF/s = {h['vs_matmul']:.2f}× the matmul ({h['matmul_tflops']:.2f} TF/s), {vs}; "
        f"diag(H) max/median {h['diag_max_over_median']:.0f}")
  timing = ("after a separate warm-up run" if meta["args"].get("warmup", "run") == "run"
            else "of one run minus JAX's compile events")
  log(f"\nper linear and method (wall time {timing}; memory: GPU peak_bytes_in_use (process-wide) and its rise in "
      "this run, or the compiled pieces' size on CPU; pred = setup + estimated iterations × step + 50 CG matmuls)")
  log(f"{'linear':>6} {'method':>13} {'time s':>8} {'compile s':>9} {'iters':>6} {'est':>5} {'CG':>4} "
      f"{'loss before':>11} {'loss after':>10} {'2:4':>4} {'memory':>22} {'pred s':>7}")
  for key, r in res["runs"].items():
    name, label = key.split("/", 1)
    if "skipped" in r:
      pred = f"; predicted {r['predicted_s']:.1f} s" if "predicted_s" in r else ""
      log(f"{name:>6} {label:>13}  skipped: {r['skipped']}{pred}")
      continue
    if "peak_after" in r:
      mem = f"{gib(r['peak_after'])} (+{gib(r['peak_rise'])})"
    else:
      mem = gib(r.get("compiled_bytes"))
    est = r.get("estimated_iterations", "")
    pred = f"{r['predicted_s']:.1f}" if "predicted_s" in r else ""
    log(f"{name:>6} {label:>13} {r['seconds']:8.2f} {r['compile_s']:9.2f} {r['iterations']:6d} {est!s:>5} "
        f"{r['refine_steps']:4d} {r['loss_before_refine']:11.5f} {r['loss_after_refine']:10.5f} "
        f"{'ok' if r['is_24'] else 'NO':>4} {mem:>22} {pred:>7}")
  fwd = res.get("forward")
  if fwd:
    log(f"\nforward estimate: 2 passes × {meta['tokens_requested']:,} tokens × {fwd['flops_per_token'] / 1e6:.1f} "
        f"MFLOP/token (7 linears + attention 4·{fwd['seqlen']}·d_attn) / {fwd['bf16_tflops']:.1f} TF/s (bf16 matmul "
        f"measured here) = {fwd['seconds']:.2f} s per block")
  twins = ", ".join(f"{n}×{lin[n]['multiplicity']} ({'/'.join(lin[n]['twins'])})"
                    for n in representatives(lin) if lin[n]["multiplicity"] > 1)
  log(f"\nextrapolation ({cfg['layers']} blocks; same-input same-shape linears timed once: {twins}; H for the 4 block "
      "inputs scaled to the requested tokens; ~ = includes predicted times of runs skipped by --deadline)")
  log(f"{'method':>13} {'prune s/block':>14} {'H s':>7} {'fwd s':>7} {'block s':>9} {'model min':>10}  notes")
  for label, e in res["extrapolation"].items():
    notes = []
    if e["missing"]:
      notes.append("incomplete: missing " + ", ".join(e["missing"]))
    if e["predicted"]:
      notes.append("~predicted: " + ", ".join(e["predicted"]))
    if e.get("precisions", [meta["precision"]]) != [meta["precision"]]:
      notes.append("matmul precision " + "+".join(e["precisions"]))
    fwd_s = "n/a" if e["forward_s"] is None else f"{e['forward_s']:.2f}"
    log(f"{label:>13} {e['prune_s']:14.1f} {e['hessian_s']:7.2f} {fwd_s:>7} {e['block_s']:9.1f} "
        f"{e['model_s'] / 60:10.1f}  {'; '.join(notes)}")
  prox = res["extrapolation"].get("prox")
  if meta["model"] == "7b" and prox:
    ok = "MET" if prox["model_s"] <= 1800 and not prox["missing"] else "NOT met"
    log(f"\ngoal 7B prox (paper schedule) + refinement ≤ 30 min on one accelerator: {prox['model_s'] / 60:.1f} min "
        f"-> {ok}{' (incomplete)' if prox['missing'] else ''}")
  peaks = [r["peak_after"] for r in res["runs"].values() if "peak_after" in r]
  if peaks:
    extra = block_memory(cfg, meta["tokens_requested"])
    limit = next((r.get("bytes_limit") for r in res["runs"].values() if r.get("bytes_limit")), None)
    total, cap = max(peaks) + extra, limit or 80 * 2**30
    log(f"\nmemory: process peak {gib(max(peaks))} (all runs, incl. every H and kernel kept by this script) + a "
        f"pipeline's block weights and calibration activations {gib(extra)} = {gib(total)} vs the device limit "
        f"{gib(cap)} -> {'fits' if total <= cap else 'does NOT fit'}")


def write(res: dict[str, Any], path: str | None) -> None:
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1, default=str)
  os.replace(tmp, path)


def merge(paths: list[str]) -> dict[str, Any]:
  res: dict[str, Any] | None = None
  for path in paths:
    with open(path, encoding="utf-8") as f:
      part = json.load(f)
    if res is None:
      res = part
      continue
    if part["meta"]["model"] != res["meta"]["model"]:
      raise SystemExit(f"{path}: model {part['meta']['model']} != {res['meta']['model']}")
    same = part["meta"]["precision"] == res["meta"]["precision"]
    res["linears"].update({k if same else f"{k}@{part['meta']['precision']}": v for k, v in part["linears"].items()})
    res["hessian"].update(part["hessian"])
    res["runs"].update(part["runs"])
    res.setdefault("forward", part.get("forward"))
    res["meta"].setdefault("merged", []).append({k: part["meta"][k] for k in ("precision", "tokens_used", "argv")})
  assert res is not None
  res["extrapolation"] = extrapolate(res)
  return res


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  """The command line (also used by ``benchmarks/real_layers.py --gpu`` for the generator's settings)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="tiny")
  p.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS),
                 help="methods to run (default all); none: only H, setup and the step benchmark")
  p.add_argument("--linears", nargs="+", choices=LINEARS, default=None,
                 help="default: one per distinct (input, shape), e.g. q o gate down for 7B")
  p.add_argument("--tokens", type=int, default=262144, help="calibration tokens per linear input (paper: 128×2048)")
  p.add_argument("--chunk", type=int, default=8192, help="tokens per generated bf16 chunk")
  p.add_argument("--seqlen", type=int, default=2048, help="sequence length for the attention FLOPs of the forward")
  p.add_argument("--precision", choices=("highest", "default"), default="highest",
                 help="matmul precision inside prune_kernel's loops and of the step benchmark (H is always HIGHEST)")
  p.add_argument("--lam0", type=float, default=0.01)
  p.add_argument("--beta", type=float, default=1.01)
  p.add_argument("--budget", type=int, default=300, help="iteration budget of the prox-budget method")
  p.add_argument("--lam0-relative", type=float, default=None, help="prox: λ₀ = this × Lκ (both prox variants)")
  p.add_argument("--cap", type=int, default=3000, help="prox iteration cap")
  p.add_argument("--weights", choices=("normal", "student"), default="normal")
  p.add_argument("--weight-std", type=float, default=0.02)
  p.add_argument("--rank-frac", type=float, default=1 / 16, help="rank of the activations' low-rank part / d")
  p.add_argument("--decay", type=float, default=0.5, help="σ_i ∝ (i+1)^-decay over the low-rank directions")
  p.add_argument("--noise", type=float, default=0.3, help="isotropic noise std (the low-rank part has variance ≈ 1)")
  p.add_argument("--outlier-frac", type=float, default=0.005)
  p.add_argument("--outlier-scale", type=float, nargs=2, default=(20.0, 100.0))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--mesh", type=int, default=None, help="run on proxjax.core.sharding.make_mesh(model=N)")
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds after start: start no run past it, skip a prox run predicted to overrun it")
  p.add_argument("--memory-analysis", action="store_true", help="compiled memory_analysis() also on GPU")
  p.add_argument("--warmup", choices=("run", "subtract"), default="run",
                 help="run: a separate warm-up call before each timed one (prox: cap=1, refine_steps=1); subtract: "
                      "one call, minus the compile time JAX reports (saves a setup, i.e. an eigvalsh, per run)")
  p.add_argument("--out", default=None, help="JSON results, rewritten after every run")
  p.add_argument("--merge", nargs="+", default=None, help="print the report of these JSONs (same model) and exit")
  return p


def main() -> None:
  p = build_parser()
  args = p.parse_args()

  if args.merge:
    res = merge(args.merge)
    report(res)
    write(res, args.out)
    return

  start = time.perf_counter()
  cfg = MODELS[args.model]
  lin = linears(cfg)
  names = args.linears or representatives(lin)
  mesh = None
  if args.mesh:
    if len(jax.devices()) < args.mesh:
      raise SystemExit(f"--mesh {args.mesh}: only {len(jax.devices())} devices")
    mesh = sharding.make_mesh(model=args.mesh, devices=jax.devices()[:args.mesh])
  peaks = device_peaks()
  dev = jax.devices()[0]
  chunk = min(args.chunk, args.tokens)
  meta = dict(model=args.model, device=f"{jax.default_backend()} {dev.device_kind} ×{len(jax.devices())}",
              jax=jax.__version__, jaxlib=_jaxlib_version(), python=platform.python_version(),
              precision=args.precision, tokens_requested=args.tokens, tokens_used=args.tokens // chunk * chunk,
              chunk=chunk, peaks=peaks, mesh=args.mesh, argv=sys.argv[1:], args=vars(args))
  res: dict[str, Any] = dict(meta=meta, model=cfg, linears={}, hessian={}, runs={}, extrapolation={})
  log(f"scale_blocks: {args.model} {cfg} | {meta['device']} | jax {jax.__version__} | python {meta['python']} | "
      f"prune precision {args.precision} (H: HIGHEST) | {os.cpu_count()} CPUs | mesh {args.mesh}")
  if peaks:
    log(f"assumed peaks ({peaks['name']}, dense): bf16 {peaks['bf16']} TF/s, TF32 {peaks['tf32']} TF/s, FP32 "
        f"(no tensor cores) {peaks['fp32']} TF/s; a float32 matmul at HIGHEST is compared with FP32, at DEFAULT "
        "with TF32")
  else:
    log("no peak table for this device: matmul rates are reported without a fraction of peak")
  log(f"linears {names} of {list(lin)}; methods {args.methods}; tokens {meta['tokens_used']:,} per input in chunks of "
      f"{chunk}; activations rank d·{args.rank_frac:g}, decay {args.decay}, noise {args.noise}, outliers "
      f"{100 * args.outlier_frac:g}% × U{tuple(args.outlier_scale)}; weights {args.weights} std {args.weight_std}")

  # Forward-pass rate: a bf16 matmul of a calibration chunk through the MLP's up projection.
  bf16_tflops = bf16_rate(chunk, cfg["hidden"], cfg["inter"], args.repeats)
  res["forward"] = dict(forward_estimate(cfg, args.tokens, args.seqlen, bf16_tflops), bf16_tflops=bf16_tflops)
  _, bf16_peak = peak_for(peaks, "default", "bfloat16")
  log(f"bf16 matmul ({chunk}×{cfg['hidden']} @ {cfg['hidden']}×{cfg['inter']}): {bf16_tflops:.2f} TF/s"
      + ("" if bf16_peak is None else f" = {100 * bf16_tflops / bf16_peak:.0f}% of the bf16 peak"))

  # Phase 1: H of every needed input, the kernels, setup and the step benchmark.
  hessians: dict[str, jax.Array] = {}
  kernels: dict[str, jax.Array] = {}
  compiled_dims: set[int] = set()
  for name in names:
    spec = lin[name]
    inp = spec["input"]
    if inp not in hessians:
      log(f"[H] {inp} (d={spec['d_in']}) ...")
      hessians[inp], rec = measure_hessian(inp, spec["d_in"], args, mesh, peaks, compiled_dims)
      res["hessian"][inp] = rec
      log(f"    {rec['seconds']:.2f} s for {rec['tokens']:,} tokens ({rec['generate_s']:.2f} s to generate alone): "
          f"{rec['tflops']:.2f} TF/s = {rec['vs_matmul']:.2f}× the bare XᵀX matmul ({rec['matmul_tflops']:.2f} TF/s)"
          + ("" if rec["vs_peak"] is None else f" = {100 * rec['vs_peak']:.0f}% of FP32 peak")
          + f"; compile {rec.get('compile_s', 0):.1f} s; diag(H) max/median {rec['diag_max_over_median']:.0f}")
    kernels[name] = random_kernel(jax.random.key(_seed(args.seed, "kernel/" + name)), (spec["d_in"], spec["d_out"]),
                                  args.weights, args.weight_std)
    log(f"[step] {name} {spec['d_in']}→{spec['d_out']} (×{spec['multiplicity']}: {'/'.join(spec['twins'])}) ...")
    step = measure_setup_and_step(kernels[name], hessians[inp], args, mesh, peaks)
    res["linears"][name] = dict(spec, **step)
    vs = "" if step["matmul_vs_peak"] is None else f" = {100 * step['matmul_vs_peak']:.0f}% of {step['peak_key']} peak"
    log(f"    setup (precondition + eigvalsh + κ) {step['setup_s']:.2f} s; L = {step['lipschitz']:.1f}, κ = "
        f"{step['kappa']:.3g}, paper-schedule estimate {step['estimated_iterations_paper']} iterations; step/matmul "
        f"{step['step_over_matmul']:.2f} (prox + count: {100 * step['rest_share']:.0f}% of the step); matmul "
        f"{1e3 * step['matmul_s']:.2f} ms, {step['matmul_tflops']:.2f} TF/s{vs}")
    write(res, args.out)

  # Phase 2: every method on every linear (methods outermost: a deadline leaves whole methods done).
  for label in args.methods:
    for name in names:
      remaining = None if args.deadline is None else args.deadline - (time.perf_counter() - start)
      log(f"[prune] {name} {label} ...")
      r = run_method(label, kernels[name], hessians[lin[name]["input"]], args, mesh, res["linears"][name], remaining)
      res["runs"][f"{name}/{label}"] = r
      if "skipped" in r:
        log(f"    skipped: {r['skipped']}" + (f"; predicted {r['predicted_s']:.1f} s" if "predicted_s" in r else ""))
      else:
        mem = (f"peak {gib(r['peak_after'])} (+{gib(r['peak_rise'])})" if "peak_after" in r
               else f"compiled {gib(r.get('compiled_bytes'))}")
        its = f"{r['iterations']} iters (est {r.get('estimated_iterations')}), " if METHODS[label][0] == "prox" else ""
        log(f"    {r['seconds']:.2f} s (+ warm-up {r['warmup_s']:.1f} s, compile {r['compile_s']:.1f} s); {its}"
            f"CG {r['refine_steps']}; loss {r['loss_before_refine']:.5f} -> {r['loss_after_refine']:.5f}; {mem}")
      res["extrapolation"] = extrapolate(res)
      write(res, args.out)

  meta["elapsed_s"] = time.perf_counter() - start
  res["extrapolation"] = extrapolate(res)
  write(res, args.out)
  report(res)
  log(f"\ntotal {meta['elapsed_s']:.1f} s, of which {_COMPILE_SECONDS[0]:.1f} s tracing, lowering and compiling")


if __name__ == "__main__":
  main()
