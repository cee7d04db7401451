"""What every workflow shares: resolving the model argument, the output directory check, the provenance a pruned
checkpoint carries, loading a model onto a mesh, evaluation windows and perplexity.

Across processes (:mod:`proxjax.core.distributed`, the ``--coordinator`` flags): every process resolves and checks the
same paths, loads the same checkpoint and tokenizes the same text; the mesh spans every process's devices (``auto``
when none is given); process 0 alone takes the output's lock and writes (:func:`save` gathers the parameters to
it first, :func:`write_once`), while the others wait for it and learn whether it succeeded."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import proxjax
from proxjax import data
from proxjax.core import distributed, files, sharding
from proxjax.models import UnsupportedModelError, load_pretrained, save_pretrained
from proxjax.models.convert import default_model_dir
from proxjax.models.hf import METADATA_FILE, remove_unfinished_saves
from proxjax.pipeline import evaluate
from proxjax.training import loop
from proxjax.workflows import paths
from proxjax.workflows.config import EvalConfig, OutputConfig

__all__ = ["check_out_dir", "evaluation_data", "load_model", "model_dir", "perplexity", "provenance", "run_dirs"]

VERSION = proxjax.__version__


def model_dir(name: str) -> str:
  """The checkpoint directory of a model argument: ``smollm2`` is the bundled SmolLM2-135M (converted into the cache
  directory at first use), anything else must be a directory."""
  if name == "smollm2":
    return str(default_model_dir())
  return paths.model_path(name)  # the same check the command line makes before loading


def check_out_dir(output: OutputConfig, source: str) -> str:
  """The absolute output directory, checked before any long work (:func:`proxjax.workflows.paths.check_output`:
  never the source, inside it or around it; a non-empty one only with ``overwrite`` and only a previous output), and
  the report path (:func:`proxjax.workflows.paths.check_file`)."""
  out_dir = paths.check_output(output.out_dir, sources=[source], overwrite=output.overwrite)
  if output.report:
    paths.check_file(output.report, sources=[source, out_dir], what="report")
  return out_dir


def run_dirs(output: OutputConfig, source: str) -> tuple[str, str]:
  """``(out_dir, state_dir)`` of a run, checked (nothing is removed here: ``restart`` acts under the lock, in
  :func:`exclusive`)."""
  out_dir = check_out_dir(output, source)
  state_dir = paths.check_state_dir(output.state_dir or out_dir.rstrip(os.sep) + ".proxjax-state", sources=[source],
                                    what="state directory")
  return out_dir, state_dir


@contextlib.contextmanager
def exclusive(out_dir: str, state_dir: str | None = None, restart: bool = False) -> Iterator[None]:
  """Holds the run's lock (``OUT_DIR.proxjax-lock``: a second run on the same output refuses instead of racing it)
  and first clears what a killed run left: unfinished saves of ``out_dir`` and half-written state files; with
  ``restart`` the whole state directory (only once the lock is held, so a refused second run deletes nothing)."""
  with files.run_lock(out_dir.rstrip(os.sep) + ".proxjax-lock", out_dir):
    remove_unfinished_saves(out_dir)
    if state_dir is not None and os.path.isdir(state_dir):
      if restart:
        shutil.rmtree(state_dir)
      else:
        files.remove_stale_temporaries(state_dir)
    yield


def resumable(job: Any, body: Callable[[Any, str, str, str], dict[str, Any]]) -> dict[str, Any]:
  """Runs ``body(job, model_dir, out_dir, state_dir)`` for a resumable workflow: the model argument resolved, the
  output and state directories checked, the output's lock held (:func:`exclusive`)."""
  model_dir_ = model_dir(job.model)
  out_dir, state_dir = run_dirs(job.out_dir, model_dir_)
  if not distributed.is_coordinator():  # several processes: process 0 alone holds the lock and writes
    return body(job, model_dir_, out_dir, state_dir)
  with exclusive(out_dir, state_dir, restart=job.out_dir.restart):
    return body(job, model_dir_, out_dir, state_dir)


def save(model: Any, out_dir: str, *, kept: str, **kwargs: Any) -> None:
  """:func:`proxjax.models.save_pretrained`, with a disk or permission failure reported in one line that says what
  was ``kept`` and how to resume (the save is atomic: nothing that looks like a finished checkpoint is left).

  Across processes, every process gathers the parameters to host (:func:`proxjax.core.distributed.gather`, one leaf
  at a time) and process 0 alone writes (:func:`write_once`)."""
  if distributed.process_count() > 1:
    graphdef, state = nnx.split(model)
    host = nnx.merge(graphdef, distributed.gather(state))
    write_once(lambda: _save(host, out_dir, kept=kept, **kwargs), f"writing the checkpoint {out_dir}")
    return
  _save(model, out_dir, kept=kept, **kwargs)


def write_once(fn: Callable[[], Any], what: str) -> Any:
  """``fn()`` on process 0 only, the other processes waiting for it (:func:`proxjax.core.distributed.on_coordinator`);
  in a single process just ``fn()``."""
  return distributed.on_coordinator(fn, what)


def _save(model: Any, out_dir: str, *, kept: str, **kwargs: Any) -> None:
  try:
    save_pretrained(model, out_dir, **kwargs)
  except (ValueError, UnsupportedModelError):
    raise
  except Exception as err:  # OSError, or safetensors' SafetensorError for a full disk
    raise OSError(f"could not write the checkpoint {out_dir} ({' '.join(str(err).split())}); {kept}") from err


def say_if_resuming(state_dir: str, marker: str | None = None) -> None:
  """Tells the user (stderr) that the run resumes: ``state_dir`` exists, or ``state_dir/marker`` when given."""
  if os.path.exists(os.path.join(state_dir, marker) if marker else state_dir):
    print(f"resuming from {state_dir}", file=sys.stderr)


def processes() -> dict[str, int]:
  """``{"processes": N}`` for a report or provenance when several processes ran the job, else ``{}``."""
  count = distributed.process_count()
  return {"processes": count} if count > 1 else {}


def training_state(state_dir: str) -> str:
  """The state directory a training workflow saves its resume state in, after saying (stderr) whether it resumes.
  Across processes it must be on a file system every process shares (:mod:`proxjax.training.loop`)."""
  say_if_resuming(state_dir, loop.STATE_FILE)
  return state_dir


def finish_training_state(output: OutputConfig, state_dir: str) -> None:
  """:func:`finish_state` by process 0 alone, the others waiting for it (:func:`write_once`)."""
  write_once(lambda: finish_state(output, state_dir), f"removing the resume state {state_dir}")


def finish_state(output: OutputConfig, state_dir: str) -> None:
  """Removes the resume state after a successful run, unless it is to be kept."""
  if not output.keep_state and os.path.isdir(state_dir):
    shutil.rmtree(state_dir)


def provenance(directory: str) -> dict[str, Any]:
  """The ``proxjax.json`` a checkpoint written by proxjax carries (empty for any other checkpoint)."""
  meta = os.path.join(directory, METADATA_FILE)
  if not os.path.exists(meta):
    return {}
  with open(meta) as f:
    return json.load(f)


def mesh_of(spec: str | None) -> Any:
  """The device mesh of a ``--mesh`` value (None without one; ``auto``, every process's devices, when several
  processes run together)."""
  if not spec and distributed.process_count() > 1:
    spec = "auto"
  return None if not spec else sharding.parse_mesh(spec)


def load_model(directory: str, mesh: Any, offload: bool = False, param_dtype: Any = None) -> Any:
  """The model, placed on the host (``offload``: every process reads the whole checkpoint into its own host memory),
  straight into its shardings on ``mesh`` (each process reads only its devices' shards), or on the default device.
  """
  kwargs = {} if param_dtype is None else {"param_dtype": param_dtype}
  if offload:
    host = sharding.host_device()
    return load_pretrained(directory, sharding=lambda path, shape: host, **kwargs)
  return load_pretrained(directory, sharding=None if mesh is None else sharding.checkpoint_sharding(mesh), **kwargs)


def evaluation_data(directory: str, config: EvalConfig) -> data.EvalData:
  """The evaluation windows of ``config`` tokenized with the model's tokenizer."""
  return data.load_evaluation(data.load_tokenizer(directory), config.dataset, seqlen=config.seqlen,
                              max_windows=config.max_windows)


@functools.cache
def logits_fn() -> Any:
  """The one jitted ``model(ids)`` every evaluation uses (evaluating twice compiles once)."""
  return nnx.jit(lambda m, ids: m(ids))  # one object: evaluating twice (before/after) compiles once


def perplexity(model: Any, eval_data: data.EvalData, batch_size: int, progress: bool,
               mesh: Any = None) -> evaluate.PerplexityResult:
  """:func:`proxjax.pipeline.evaluate.perplexity` of ``model`` on ``eval_data``'s windows; with the ``mesh`` the model
  is placed on, the windows are split over its devices (required when it spans several processes)."""
  logits = logits_fn()
  return evaluate.perplexity(lambda ids: logits(model, jnp.asarray(ids)), eval_data.windows, batch_size=batch_size,
                             progress=progress, mesh=mesh)
