"""Typed, frozen configurations of the workflows (one per ``proxjax`` command), validated when built.

They import no JAX, so the command line builds and checks one before it loads anything: a bad argument is reported
in one line, exit code 2, with no model loaded. A Python user builds the same objects and passes them to the
workflow functions of :mod:`proxjax.workflows`.

Example:
  >>> job = PruneJob("smollm2", "out/wanda", PruneConfig.from_options("wanda"),
  ...                calibration=CalibrationConfig(nsamples=32, seqlen=512))
  >>> job.prune.method_name, job.calibration.tokens
  ('wanda', 16384)
  >>> EvalConfig("lee", seqlen=1)
  Traceback (most recent call last):
  ValueError: eval seqlen must be an int >= 2, got 1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from proxjax.pruning.methods import PruneConfig

__all__ = [
    "CalibrationConfig",
    "EvalConfig",
    "EvalJob",
    "FinetuneJob",
    "OutputConfig",
    "ProSparseJob",
    "ProxSparseJob",
    "PruneJob",
    "TrainingJob",
    "C4_CALIBRATION_DOCUMENTS",
    "parse_stage",
]

C4_CALIBRATION_DOCUMENTS = 20_000
"""Documents read from the streamed c4 shard when no count is given (the shard has about 356 k)."""


def parse_stage(text: str) -> tuple[int, float]:
  """``"STEP:PEAK"`` → ``(STEP, PEAK)``, one stage of :func:`proxjax.training.prosparse.l1_schedule` (``STEP`` is where it ends).

  Example:
    >>> parse_stage("200:5e-5")
    (200, 5e-05)
  """
  step, sep, peak = str(text).partition(":")
  try:
    if not sep:
      raise ValueError
    return int(step), float(peak)
  except ValueError:
    raise ValueError(f"a λ stage must be STEP:PEAK (an int step where the stage ends and its peak λ), "
                     f"got {text!r}") from None


def _int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return value


def _optional_int(name: str, value: Any, low: int) -> None:
  if value is not None:
    _int(name, value, low)


def _finite(name: str, value: Any, low: float = 0.0, strict: bool = False) -> None:
  ok = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        and (value > low if strict else value >= low))
  if not ok:
    raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _patterns(value: Any, name: str) -> tuple[str, ...] | None:
  if value is None:
    return None
  if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
    raise ValueError(f"{name} must be a list of non-empty fnmatch patterns, got {value!r}")
  return tuple(value)


def _set(obj: Any, name: str, value: Any) -> None:
  object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """Calibration text (docs/method.md, "Pipeline").

  Attributes:
    source: ``wiki`` (offline Wikipedia, default), ``lee``, ``c4`` (online), ``wikitext2``, or a file path.
    mode: ``packed`` (documents joined with EOS, consecutive windows) or ``random`` (Wanda's random windows).
    documents: use only the first K documents (default all; :data:`C4_CALIBRATION_DOCUMENTS` for c4).
    nsamples: calibration sequences.
    seqlen: tokens per sequence.
    seed: sampling seed.
  """
  source: str = "wiki"
  mode: str = "packed"
  documents: int | None = None
  nsamples: int = 128
  seqlen: int = 2048
  seed: int = 0

  def __post_init__(self) -> None:
    if not isinstance(self.source, str) or not self.source:
      raise ValueError(f"calibration source must be a name or a path, got {self.source!r}")
    if self.mode not in ("packed", "random"):
      raise ValueError(f"calibration mode must be 'packed' or 'random', got {self.mode!r}")
    _optional_int("calibration documents", self.documents, 1)
    _int("nsamples", self.nsamples, 1)
    _int("seqlen", self.seqlen, 1)
    _int("seed", self.seed, 0)

  @property
  def max_documents(self) -> int | None:
    if self.documents is None and self.source == "c4":
      return C4_CALIBRATION_DOCUMENTS  # streamed: the first documents of the shard
    return self.documents

  @property
  def tokens(self) -> int:
    return self.nsamples * self.seqlen


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Perplexity evaluation (docs/method.md, "Evaluation protocol").

  Attributes:
    dataset: ``wikitext2``, ``c4`` (online), ``wiki`` or ``lee`` (offline evaluation articles), or a file path.
    seqlen: tokens per window.
    max_windows: evaluate at most this many windows.
    batch_size: windows per forward pass.
  """
  dataset: str
  seqlen: int = 512
  max_windows: int | None = None
  batch_size: int = 8

  def __post_init__(self) -> None:
    if not isinstance(self.dataset, str) or not self.dataset:
      raise ValueError(f"the evaluation dataset must be a name or a path, got {self.dataset!r}")
    _int("eval seqlen", self.seqlen, 2)
    _optional_int("max_windows", self.max_windows, 1)
    _int("eval batch size", self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  """Where a workflow writes and how it resumes.

  Attributes:
    out_dir: the output checkpoint directory.
    overwrite: replace a non-empty ``out_dir``.
    state_dir: the resume state (default ``OUT_DIR.proxjax-state``).
    restart: discard existing resume state first.
    keep_state: keep the resume state after success.
    report: the JSON report path (default inside ``out_dir``).
  """
  out_dir: str
  overwrite: bool = False
  state_dir: str | None = None
  restart: bool = False
  keep_state: bool = False
  report: str | None = None

  def __post_init__(self) -> None:
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise ValueError(f"the output directory must be a path, got {self.out_dir!r}")

  @classmethod
  def of(cls, value: str | OutputConfig) -> OutputConfig:
    """``value`` itself, or an output configuration with defaults for the path ``value``."""
    if isinstance(value, OutputConfig):
      return value
    if isinstance(value, str):
      return cls(value)
    raise ValueError(f"out_dir must be a path or an OutputConfig, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PruneJob:
  """``proxjax prune``: prune a checkpoint block by block and save it (:func:`proxjax.workflows.prune.prune`).

  Attributes:
    model: a Hugging Face checkpoint directory, or ``smollm2`` (the bundled model).
    out_dir: the output directory (or an :class:`OutputConfig`).
    prune: the :class:`~proxjax.pruning.methods.PruneConfig` (method, options, refinement, N:M).
    calibration: the :class:`CalibrationConfig`.
    true_sequential: prune in stages q,k,v → o → gate,up → down (default on).
    include: fnmatch patterns over ``BLOCK.NAME`` to prune (default all).
    ignore: patterns to leave dense.
    batch_size: sequences per forward pass.
    eval: perplexity after pruning (an :class:`EvalConfig`), or ``None``.
    plot: the per-layer loss PNG (default inside ``out_dir``).
    mesh: ``auto``, ``N`` or ``data=D,model=M`` (None: one device).
    offload: keep the model in host memory, one block on the devices at a time.
    progress: progress bars.
  """
  model: str
  out_dir: Any
  prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
  calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
  true_sequential: bool = True
  include: Sequence[str] | None = None
  ignore: Sequence[str] | None = None
  batch_size: int = 8
  eval: EvalConfig | None = None
  plot: str | None = None
  mesh: str | None = None
  offload: bool = False
  progress: bool = True

  def __post_init__(self) -> None:
    _set(self, "out_dir", OutputConfig.of(self.out_dir))
    if not isinstance(self.prune, PruneConfig):
      raise ValueError(f"prune must be a PruneConfig, got {self.prune!r}")
    _set(self, "include", _patterns(self.include, "include"))
    _set(self, "ignore", _patterns(self.ignore, "ignore"))
    _int("batch_size", self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class EvalJob:
  """``proxjax eval``: perplexity of a checkpoint (:func:`proxjax.workflows.evaluate.evaluate`).

  Attributes:
    model: a checkpoint directory or ``smollm2``.
    eval: the :class:`EvalConfig`.
    json: write the result here as JSON.
    mesh: as for :class:`PruneJob`.
    progress: progress bars.
  """
  model: str
  eval: EvalConfig
  json: str | None = None
  mesh: str | None = None
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class TrainingJob:
  """What every training workflow shares (fields after ``out_dir`` are keyword-only).

  Attributes:
    model: a checkpoint directory or ``smollm2``.
    out_dir: the output directory (or an :class:`OutputConfig`).
    train: the training text (a corpus name or path; its calibration split).
    steps: optimizer steps.
    batch_size: sequences (windows or documents) per step.
    seqlen: tokens per sequence (at most, for documents).
    learning_rate: the (peak) learning rate.
    eval: perplexity before and after, or ``None``.
    save_every: save the training state (the output's state directory) every N steps (0: only after the last).
    mesh: as for :class:`PruneJob` (``auto`` when several processes run the job); each batch is split over its
      devices.
    progress: progress bars.
  """
  model: str
  out_dir: Any
  _: dataclasses.KW_ONLY
  train: str = "wiki"
  steps: int = 100
  batch_size: int = 4
  seqlen: int = 256
  learning_rate: float = 2e-5
  eval: EvalConfig | None = None
  save_every: int = 50
  mesh: str | None = None
  progress: bool = True

  def __post_init__(self) -> None:
    _set(self, "out_dir", OutputConfig.of(self.out_dir))
    _int("steps", self.steps, 1)
    _int("batch_size", self.batch_size, 1)
    _int("seqlen", self.seqlen, 2)
    _finite("learning rate", self.learning_rate)
    _int("save_every", self.save_every, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneJob(TrainingJob):
  """``proxjax finetune``: recovery fine-tuning with the sparsity mask fixed (:func:`proxjax.workflows.finetune`);
  the fields of :class:`TrainingJob` and:

  Attributes:
    weight_decay: AdamW's weight decay (the learning rate is constant).
    seed: the window sampling seed.
    check: verify that every pruned weight is still exactly zero after training.
  """
  weight_decay: float = 0.0
  seed: int = 0
  check: bool = True

  def __post_init__(self) -> None:
    super().__post_init__()
    _finite("weight decay", self.weight_decay)
    _int("seed", self.seed, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProxSparseJob(TrainingJob):
  """``proxjax proxsparse``: learn 2:4 masks end to end (:func:`proxjax.workflows.proxsparse`); docs/method.md,
  "ProxSparse". The fields of :class:`TrainingJob` (one batch of documents per step, 10 % warm-up then linear decay
  of the learning rate) and:

  Attributes:
    lam1: λ₁, the per-step prox strength (``prox_scaling="strength"``) or the weight of R (``"lr"``).
    lam_relative: divide λ₁ by each kernel's mean ``|W₀|``.
    lam2: λ₂ of the pull towards ``W₀`` or 0.
    eps: ε of the λ₂ term.
    prox_scaling: ``strength`` or ``lr``.
    max_documents: use only the first K documents.
    split_documents: cut documents into pieces of ``seqlen`` tokens instead of truncating them.
  """
  lam1: float
  steps: int = 400
  batch_size: int = 1
  seqlen: int = 512
  learning_rate: float = 1e-4
  lam_relative: bool = False
  lam2: float = 0.0
  eps: float = 0.5
  prox_scaling: str = "strength"
  max_documents: int | None = None
  split_documents: bool = False

  def __post_init__(self) -> None:
    super().__post_init__()
    _finite("lam1", self.lam1)
    _finite("lam2", self.lam2)
    _finite("eps", self.eps, strict=True)
    if self.prox_scaling not in ("strength", "lr"):
      raise ValueError(f"prox_scaling must be 'strength' or 'lr', got {self.prox_scaling!r}")
    _optional_int("max_documents", self.max_documents, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProSparseJob(TrainingJob):
  """``proxjax prosparse``: ReLU, L1 on FFN activations, threshold shift (:func:`proxjax.workflows.prosparse`);
  docs/method.md, "ProSparse". The fields of :class:`TrainingJob` (packed windows) and:

  Attributes:
    seed: the window shuffle seed.
    lr_schedule: ``cosine`` (to 10 % at the last step) or ``constant``.
    lr_warmup_steps: linear warm-up steps.
    weight_decay: AdamW's weight decay.
    l1_warmup: λ₀ of the warm-up stage.
    l1_warmup_steps: steps of the warm-up stage.
    l1_stages: ``(end step, peak λ)`` of each sine stage.
    threshold: the FATReLU threshold set after training (0: plain ReLU).
    export: with ``threshold > 0`` (required then): ``fatrelu`` or ``relu``.
  """
  learning_rate: float = 5e-5
  seed: int = 0
  lr_schedule: str = "cosine"
  lr_warmup_steps: int = 0
  weight_decay: float = 0.0
  l1_warmup: float = 0.0
  l1_warmup_steps: int = 0
  l1_stages: Sequence[tuple[int, float]] = ()
  threshold: float = 0.0
  export: str | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    _set(self, "l1_stages", tuple((int(e), float(v)) for e, v in self.l1_stages))
    _int("seed", self.seed, 0)
    if self.lr_schedule not in ("cosine", "constant"):
      raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
    _int("lr_warmup_steps", self.lr_warmup_steps, 0)
    _finite("weight decay", self.weight_decay)
    _finite("l1_warmup", self.l1_warmup)
    _int("l1_warmup_steps", self.l1_warmup_steps, 0)
    if self.l1_warmup_steps > self.steps or any(end > self.steps for end, _ in self.l1_stages):
      raise ValueError(f"l1_warmup_steps and every l1 stage's end step must be <= steps ({self.steps})")
    _finite("threshold", self.threshold)
    if self.export not in (None, "fatrelu", "relu"):
      raise ValueError(f"export must be 'fatrelu', 'relu' or None, got {self.export!r}")
    if self.threshold > 0 and self.export is None:
      raise ValueError(
          f"threshold {self.threshold:g} makes a FATReLU model (x if x > θ else 0), which Hugging Face "
          "transformers cannot run: choose how to save it, export 'fatrelu' (config.json hidden_act 'fatrelu', "
          f"hidden_act_param {self.threshold:g}: exact in proxjax, refused by transformers) or export 'relu' (the "
          "trained weights as plain ReLU, θ = 0, which transformers runs faithfully; both are measured)")
    if self.threshold == 0 and self.export == "fatrelu":
      raise ValueError("export 'fatrelu' needs threshold > 0")
