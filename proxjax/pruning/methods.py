r"""Typed configuration of the layer pruning methods and of refinement, and the registry of methods by name.

Every setting of :func:`proxjax.prune_kernel`, :func:`proxjax.pipeline.prune_model`, the memory planner and the
``proxjax prune`` command lives in one of these frozen dataclasses, validated when it is built, so a mistake is
reported before any model is loaded. This module imports no JAX: the command line builds and checks its
configuration before it pays for importing JAX.

* :class:`ProxConfig`, :class:`WandaConfig`, :class:`SparseGPTConfig`, :class:`MagnitudeConfig`: one per method
  (``METHODS`` maps the names to them); see docs/method.md, sections "The prox method", "Schedule and iteration
  estimate" and "Baselines", for what each setting means.
* :class:`RefineConfig`: masked GD or CG on the kept weights (docs/method.md, "Refinement").
* :class:`PruneConfig`: a method, its refinement, the N:M pattern and the matmul precision.

The two dampings have different names: SparseGPT's ``damp`` adds ``damp · mean(diag H)`` to the diagonal of ``H``
before its inverse; the prox's and the refinement's ``ridge`` adds ``ridge · I`` to the preconditioned ``H̃`` (unit
diagonal) inside their loops, i.e. the term ``(ridge/2)‖K̃ − K̃₀‖²``.

Example:
  >>> cfg = PruneConfig.from_options("sparsegpt", refine="cg", damp=0.02)
  >>> cfg.method, cfg.refine.kind, cfg.refine.steps
  (SparseGPTConfig(blocksize=128, damp=0.02), 'cg', 200)
  >>> PruneConfig.from_options("wanda", damp=0.01)
  Traceback (most recent call last):
  ValueError: method 'wanda' has no option 'damp' (its options: none; refinement: refine_steps, refine_tol, refine_ridge; all: precision)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from proxjax.core.pattern import check_blocksize, check_nm

__all__ = [
    "METHODS",
    "MagnitudeConfig",
    "MethodConfig",
    "ProxConfig",
    "PruneConfig",
    "REFINES",
    "RefineConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "method_config",
]

REFINES = ("gd", "cg")
PRECISIONS = ("highest", "high", "default")


def _number(name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False,
            open_high: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
    raise ValueError(f"{name} must be a number, got {value!r}")
  if low is not None and (value < low or (open_low and value == low)):
    raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
  if high is not None and (value > high or (open_high and value == high)):
    raise ValueError(f"{name} must be {'<' if open_high else '<='} {high}, got {value!r}")
  return float(value)


def _int(name: str, value: Any, *, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class ProxConfig:
  """The prox method (docs/method.md, "The prox method", "Schedule and iteration estimate" and "Acceleration").

  The schedule ``λ_k = λ₀ β^k`` is set by one of ``lam0`` (absolute) or ``lam0_relative`` (``λ₀ = r · L κ``) and one
  of ``beta`` or ``budget`` (``β = (L κ / λ₀)^{1/budget}``); with neither of a pair the default is used:
  ``lam0_relative = 1e-4`` and ``budget = 150``, paced by the state (``pace = 0.01``), with FISTA's acceleration and
  the column stop (benchmarks/README.md, "Prox quality per cost"). The paper's schedule is
  :meth:`paper` (``λ₀ = 0.01``, ``β = 1.01``, no acceleration: about 10× the iterations for the same loss,
  benchmarks/README.md, "Prox quality per cost").

  Attributes:
    lam0: the first ``λ₀ > 0`` (absolute), or ``None``.
    beta: ``β >= 1``, the growth of ``λ`` per iteration, or ``None``.
    cap: the iteration cap.
    ridge: ``δ >= 0`` added as ``δ·I`` to ``H̃`` inside the loop.
    quantile: the quantile in ``(0, 1]`` of ``a3/(a1 a2)`` that sets ``κ``.
    lam0_relative: ``λ₀ = lam0_relative · L κ`` (scale-free), or ``None``.
    budget: ``β = (L κ / λ₀)^{1/budget}`` (about ``budget`` iterations), or ``None``.
    tail_fraction: stop when at most this fraction of groups is not 2:4, and project those.
    loop: ``"while"`` (stops when done) or ``"scan"`` (fixed length ``cap``, same iterates).
    accelerate: FISTA's extrapolation between prox-gradient steps; the prox stays exact.
    column_stop: each output column (its own problem: the local loss and ``R`` are sums over columns) stops when it
      is 2:4 and keeps that iterate; ``False``: every column runs until the whole kernel is 2:4 (the paper's rule).
    pace: ``0``: ``λ_k = λ₀ β^k``. Else ``λ`` is paced by the state: each iteration multiplies it by ``β^f``,
      ``f = clip(pace · #groups / settled, ½, 2)`` with ``settled`` the groups that became 2:4 in the last
      iteration, so that about ``pace · #groups`` groups settle per iteration. ``None`` (the default): ``0.01``
      when ``β`` comes from a budget, ``0`` when ``beta`` is given (an explicit ``β`` means ``λ₀ β^k``); resolved by
      :attr:`pacing`.
    grad_dtype: the operand dtype of the loop's gradient matmul ``H̃ (Z − K̃₀)``: ``"bfloat16"`` (the default: both
      operands rounded to bfloat16, the products accumulated in float32) or ``"float32"``. The iterate, the prox
      and the refinement are float32 either way; the prox stays exact for the point it is given (docs/method.md,
      "The prox method").
  """
  name: ClassVar[str] = "prox"
  default_refine: ClassVar[str | None] = "cg"
  DEFAULT_LAM0_RELATIVE: ClassVar[float] = 1e-4
  DEFAULT_BUDGET: ClassVar[int] = 150
  DEFAULT_PACE: ClassVar[float] = 0.01
  PAPER: ClassVar[Mapping[str, Any]] = {"lam0": 0.01, "beta": 1.01, "accelerate": False, "column_stop": False,
                                         "pace": 0.0, "grad_dtype": "float32"}
  GRAD_DTYPES: ClassVar[tuple[str, ...]] = ("bfloat16", "float32")
  lam0: float | None = None
  beta: float | None = None
  cap: int = 3000
  ridge: float = 0.0
  quantile: float = 0.99
  lam0_relative: float | None = None
  budget: int | None = None
  tail_fraction: float = 0.0
  loop: str = "while"
  accelerate: bool = True
  column_stop: bool = True
  pace: float | None = None
  grad_dtype: str = "bfloat16"

  @classmethod
  def paper(cls, **overrides: Any) -> ProxConfig:
    """The paper's schedule: ``λ₀ = 0.01``, ``β = 1.01``, plain proximal gradient (no acceleration).

    Example:
      >>> ProxConfig.paper().start, ProxConfig.paper().growth
      (('lam0', 0.01), ('beta', 1.01))
    """
    return cls(**{**cls.PAPER, **overrides})

  @property
  def start(self) -> tuple[str, float]:
    """``("lam0", λ₀)`` or ``("lam0_relative", r)``: how ``λ₀`` is set."""
    if self.lam0 is not None:
      return "lam0", self.lam0
    return "lam0_relative", self.DEFAULT_LAM0_RELATIVE if self.lam0_relative is None else self.lam0_relative

  @property
  def pacing(self) -> float:
    """The resolved ``pace``: ``pace`` if given, else :attr:`DEFAULT_PACE` with a budget and ``0`` with ``beta``.

    Example:
      >>> ProxConfig().pacing, ProxConfig(beta=1.05).pacing, ProxConfig(budget=300, pace=0.0).pacing
      (0.01, 0.0, 0.0)
    """
    if self.pace is not None:
      return self.pace
    return self.DEFAULT_PACE if self.beta is None else 0.0

  @property
  def schedule_rule(self) -> dict[str, float]:
    """The schedule's rule with the defaults resolved (:attr:`start`, :attr:`growth`, :attr:`pacing`), for run
    headers and reports (the fields themselves stay ``None`` where a default applies).

    Example:
      >>> ProxConfig().schedule_rule
      {'lam0_relative': 0.0001, 'budget': 150, 'pace': 0.01}
      >>> ProxConfig(lam0=0.01, beta=1.01).schedule_rule
      {'lam0': 0.01, 'beta': 1.01, 'pace': 0.0}
    """
    return dict((self.start, self.growth, ("pace", self.pacing)))

  @property
  def growth(self) -> tuple[str, float]:
    """``("beta", β)`` or ``("budget", K)``: how ``β`` is set."""
    if self.beta is not None:
      return "beta", self.beta
    return "budget", self.DEFAULT_BUDGET if self.budget is None else self.budget

  def __post_init__(self) -> None:
    if self.lam0 is not None:
      _number("lam0", self.lam0, low=0.0, open_low=True)
    if self.beta is not None:
      _number("beta", self.beta, low=1.0)
    if self.lam0 is not None and self.lam0_relative is not None:
      raise ValueError("give lam0 (absolute) or lam0_relative, not both")
    if self.beta is not None and self.budget is not None:
      raise ValueError("give beta or budget (which sets beta), not both")
    _int("cap", self.cap, low=1)
    _number("ridge", self.ridge, low=0.0)
    _number("quantile", self.quantile, low=0.0, high=1.0, open_low=True)
    if self.lam0_relative is not None:
      _number("lam0_relative", self.lam0_relative, low=0.0, open_low=True)
    if self.budget is not None:
      _int("budget", self.budget, low=1)
    _number("tail_fraction", self.tail_fraction, low=0.0, high=1.0, open_high=True)
    if self.loop not in ("while", "scan"):
      raise ValueError(f"loop must be 'while' or 'scan', got {self.loop!r}")
    if self.pace is not None:
      _number("pace", self.pace, low=0.0, high=1.0, open_high=True)
    if self.grad_dtype not in self.GRAD_DTYPES:
      raise ValueError(f"grad_dtype must be one of {self.GRAD_DTYPES}, got {self.grad_dtype!r}")
    for flag in ("accelerate", "column_stop"):
      if not isinstance(getattr(self, flag), bool):
        raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

  def check_pattern(self, n: int, m: int) -> None:
    if (n, m) != (2, 4):
      raise ValueError(f"method 'prox' prunes to 2:4 only (its regularizer is 2:4-specific), got n={n}, m={m}; "
                       "use 'wanda' or 'sparsegpt' for other N:M patterns")


@dataclasses.dataclass(frozen=True)
class WandaConfig:
  """Wanda: keep the ``n`` largest ``|K_jc| · sqrt(H_jj)`` per group (docs/method.md, "Baselines")."""
  name: ClassVar[str] = "wanda"
  default_refine: ClassVar[str | None] = None

  def check_pattern(self, n: int, m: int) -> None:
    del n, m


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig:
  """Magnitude: keep the ``n`` largest ``|K_jc|`` per group (docs/method.md, "Baselines")."""
  name: ClassVar[str] = "magnitude"
  default_refine: ClassVar[str | None] = None

  def check_pattern(self, n: int, m: int) -> None:
    del n, m


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
  """SparseGPT (docs/method.md, "Baselines").

  Attributes:
    blocksize: columns per lazy-update block, a positive multiple of ``m``.
    damp: ``damp · mean(diag H)`` is added to the diagonal of ``H`` before its inverse.
  """
  name: ClassVar[str] = "sparsegpt"
  default_refine: ClassVar[str | None] = None
  blocksize: int = 128
  damp: float = 0.01

  def __post_init__(self) -> None:
    check_blocksize(self.blocksize, 1)
    _number("damp", self.damp, low=0.0)

  def check_pattern(self, n: int, m: int) -> None:
    del n
    check_blocksize(self.blocksize, m)


MethodConfig = ProxConfig | WandaConfig | SparseGPTConfig | MagnitudeConfig

METHODS: dict[str, type] = {"prox": ProxConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig,
                            "magnitude": MagnitudeConfig}
"""The registry: method name → its configuration class."""


def _fields(cls: type) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def method_config(name: str, **options: Any) -> MethodConfig:
  """The configuration of method ``name`` with ``options``; an option the method does not take is a ValueError.

  Example:
    >>> method_config("prox", budget=300)
    ProxConfig(lam0=None, beta=None, cap=3000, ridge=0.0, quantile=0.99, lam0_relative=None, budget=300, tail_fraction=0.0, loop='while', accelerate=True, column_stop=True, pace=None, grad_dtype='bfloat16')
  """
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of {tuple(METHODS)}")
  cls = METHODS[name]
  unknown = sorted(set(options) - set(_fields(cls)))
  if unknown:
    raise ValueError(f"method {name!r} has no option{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(repr(u) for u in unknown)} (its options: {', '.join(_fields(cls)) or 'none'})")
  return cls(**options)


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Refinement of the kept weights on the local loss (docs/method.md, "Refinement").

  Attributes:
    kind: ``"gd"`` (the paper's masked gradient descent) or ``"cg"`` (masked conjugate gradients).
    steps: GD steps, or the cap on CG iterations; default 1000 for GD, 200 for CG.
    tol: CG's relative residual tolerance per column.
    ridge: ``δ >= 0`` added as ``δ·I`` to ``H̃``.
  """
  DEFAULT_STEPS: ClassVar[Mapping[str, int]] = {"gd": 1000, "cg": 200}
  kind: str = "cg"
  steps: int | None = None
  tol: float = 1e-6
  ridge: float = 0.0

  def __post_init__(self) -> None:
    if self.kind not in REFINES:
      raise ValueError(f"refine must be one of {REFINES} or None, got {self.kind!r}")
    if self.steps is None:
      object.__setattr__(self, "steps", self.DEFAULT_STEPS[self.kind])
    _int("refine_steps", self.steps, low=0)
    _number("refine_tol", self.tol, low=0.0)
    _number("refine_ridge", self.ridge, low=0.0)


_REFINE_OPTIONS = {"refine_steps": "steps", "refine_tol": "tol", "refine_ridge": "ridge"}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Everything that decides how one kernel is pruned.

  Attributes:
    method: a method configuration, or a method name for its defaults.
    refine: a :class:`RefineConfig`, ``"gd"``, ``"cg"``, ``None`` / ``"none"`` (no refinement), or ``"auto"``: the
      method's default (CG for the prox, none for the baselines).
    n: kept weights per group.
    m: group size (groups run along the kernel's input axis).
    precision: matmul precision of the loops' float32 matmuls (``"highest"``: full float32 on every backend; the
      prox loop's gradient is bfloat16 by default, ``ProxConfig.grad_dtype``).
  """
  method: Any = dataclasses.field(default_factory=ProxConfig)
  refine: Any = "auto"
  n: int = 2
  m: int = 4
  precision: str = "highest"

  def __post_init__(self) -> None:
    method = self.method
    if isinstance(method, str):
      method = method_config(method)
    if not isinstance(method, tuple(METHODS.values())):
      raise ValueError(f"method must be one of {tuple(METHODS)} or its configuration, got {method!r}")
    refine = self.refine
    if refine == "auto":
      refine = method.default_refine
    if refine == "none":
      refine = None
    if isinstance(refine, str):
      refine = RefineConfig(refine)
    if refine is not None and not isinstance(refine, RefineConfig):
      raise ValueError(f"refine must be 'gd', 'cg', None, 'auto' or a RefineConfig, got {refine!r}")
    check_nm(self.n, self.m)
    method.check_pattern(self.n, self.m)
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
    object.__setattr__(self, "method", method)
    object.__setattr__(self, "refine", refine)

  @property
  def method_name(self) -> str:
    return self.method.name

  @property
  def refine_kind(self) -> str | None:
    return None if self.refine is None else self.refine.kind

  @classmethod
  def from_options(cls, method: str | MethodConfig = "prox", *, refine: Any = "auto", n: int = 2, m: int = 4,
                   **options: Any) -> PruneConfig:
    """A configuration from flat keyword options, as :func:`proxjax.prune_kernel` and ``--option`` take them:
    the method's own fields, ``refine_steps`` / ``refine_tol`` / ``refine_ridge`` and ``precision``."""
    name = method if isinstance(method, str) else method.name
    if name not in METHODS:
      raise ValueError(f"unknown method {name!r}; expected one of {tuple(METHODS)}")
    own = {k: v for k, v in options.items() if k in _fields(METHODS[name])}
    ref = {_REFINE_OPTIONS[k]: v for k, v in options.items() if k in _REFINE_OPTIONS}
    common = {k: v for k, v in options.items() if k == "precision"}
    unknown = sorted(set(options) - set(own) - set(_REFINE_OPTIONS) - set(common))
    if unknown:
      raise ValueError(
          f"method {name!r} has no option{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
          f"(its options: {', '.join(_fields(METHODS[name])) or 'none'}; refinement: "
          f"{', '.join(_REFINE_OPTIONS)}; all: precision)")
    if isinstance(method, str):
      method = METHODS[name](**own)
    elif own:
      method = dataclasses.replace(method, **own)
    if ref:
      if refine == "auto":
        refine = METHODS[name].default_refine
      if refine is None or refine == "none":
        raise ValueError(f"{', '.join(sorted(_REFINE_OPTIONS[k] for k in options if k in _REFINE_OPTIONS))} "
                         "given without a refinement (refine is None)")
      refine = dataclasses.replace(refine, **ref) if isinstance(refine, RefineConfig) else RefineConfig(refine, **ref)
    return cls(method, refine, n, m, **common)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready description (run fingerprints, reports, provenance)."""
    return {"method": self.method.name, "options": dataclasses.asdict(self.method),
            "refine": None if self.refine is None else dataclasses.asdict(self.refine),
            "n": self.n, "m": self.m, "precision": self.precision}
