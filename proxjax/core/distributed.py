r"""Several processes as one JAX program: joining JAX's multi-process runtime with bounded waits, refusing processes
that run different jobs, and the few collective helpers the workflows need to read and write results once.

Every process (one per host, or several on one machine) runs the same command with its own ``process_id``;
:func:`initialize` joins them through ``jax.distributed.initialize`` before anything touches a device, after which
``jax.devices()`` lists every process's devices and :func:`proxjax.core.sharding.make_mesh` builds one global mesh over
them. Arrays on that mesh are *global*: a process holds, and can read, only the shards on its own devices
(``addressable_shards``); :func:`gather` turns them into a host array on every process (a collective).

**Failure bound.** :func:`initialize` passes ``join_timeout`` as JAX's initialization timeout and
``heartbeat_timeout`` as both its heartbeat and its shutdown timeout, so no process waits forever for another:

* a process that never joins: every process that did exits (JAX's runtime aborts it: exit status 134, SIGABRT)
  ``join_timeout`` + :data:`JOIN_EXTRA_S` seconds after it began to wait (JAX's registration adds about 5 s, measured
  with JAX 0.10.2 for join timeouts of 5 and 10 s and heartbeats of 2 to 12 s);
* a process that dies (killed, crashed, its host lost): the others abort within ``heartbeat_timeout`` +
  :data:`DETECT_EXTRA_S` seconds (the runtime's error polling; measured 5.1 to 6.0 s with a 5 s heartbeat);
* a process that stops with a Python error (a bad file on one host): it waits at most ``heartbeat_timeout`` seconds
  for the others at JAX's shutdown barrier, which then fails and aborts every process.

The abort's message is JAX's (``Terminating process because the JAX distributed service detected fatal errors. This
most likely indicates that another task died``); :func:`initialize` prints the bound on stderr before joining, so the
log of every process says what to expect. The abort cannot be replaced by a message of ours: JAX 0.10.2's
``jax.distributed.initialize`` takes no callback for it, and its runtime client (``get_distributed_runtime_client``)
accepts a ``missed_heartbeat_callback`` that, given a Python function, fails to pass it the error status
(``std::bad_cast``) and terminates the process all the same (measured). A process that is alive but stuck (a deadlock
in Python) still sends heartbeats: it is not detected.

**Resume state.** :func:`resume_directory` tells whether every process reads the same state directory (a shared
file system), so that process 0 alone writes a run's resume state and every process resumes from it
(:func:`proxjax.pipeline.prune_model`, :func:`proxjax.training.loop.run`).

**Same job everywhere.** :func:`check_same` exchanges a SHA-256 of a job description (the parsed arguments) through the
runtime (an all-gather of 16 bytes per process) and raises the same ``ValueError`` on every process when they differ.

Example (one process, a runtime of one: what the tests of tests/test_multihost.py do with two)::

  from proxjax.core import distributed
  distributed.initialize(distributed.DistributedConfig("127.0.0.1:12345", num_processes=1, process_id=0),
                         fingerprint={"command": "prune", "method": "wanda"})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["AUTO", "DistributedConfig", "allgather_int", "broadcast_int", "check_same", "fingerprint", "gather",
           "initialize", "is_coordinator", "on_coordinator", "process_count", "resume_directory"]

T = TypeVar("T")

AUTO = "auto"
"""The coordinator that lets JAX's cluster auto-detection (``jax.distributed.initialize()`` without arguments) find
the coordinator, the number of processes and this process's index (:func:`initialize`)."""

JOIN_EXTRA_S = 5
"""Seconds JAX's runtime takes beyond ``join_timeout`` to give up on a process that never joins (measured)."""

DETECT_EXTRA_S = 2
"""Seconds beyond ``heartbeat_timeout`` within which the others abort after a process died (measured: about 1)."""

_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins the others (validated when built; imports nothing).

  Attributes:
    coordinator: ``HOST:PORT`` of process 0, where it serves the runtime's coordination service (the same on every
      process; ``[::1]:PORT`` for an IPv6 address), or :data:`AUTO`: JAX's cluster auto-detection finds it, and the
      two below when they are ``None`` (see :func:`initialize`).
    num_processes: how many processes take part (``None`` only with :data:`AUTO`).
    process_id: this process's index, ``0 <= process_id < num_processes``; process 0 is the coordinator and the one
      that writes outputs (``None`` only with :data:`AUTO`).
    join_timeout: seconds every process waits for all of them to join (JAX's ``initialization_timeout``).
    heartbeat_timeout: seconds without a heartbeat after which a process counts as dead, and seconds a finished or
      failed process waits for the others at shutdown (see the module docstring for the bound this gives).

  Example:
    >>> DistributedConfig("10.0.0.1:1234", num_processes=2, process_id=1).bound
    305
    >>> DistributedConfig("auto").num_processes is None  # SLURM, Cloud TPU, ... say it (initialize)
    True
    >>> DistributedConfig("10.0.0.1", num_processes=2, process_id=0)
    Traceback (most recent call last):
    ValueError: coordinator must be HOST:PORT (e.g. 10.0.0.1:1234) or 'auto', got '10.0.0.1'
  """
  coordinator: str
  num_processes: int | None = None
  process_id: int | None = None
  join_timeout: int = 300
  heartbeat_timeout: int = 60

  def __post_init__(self) -> None:
    match = _ADDRESS.fullmatch(self.coordinator) if isinstance(self.coordinator, str) else None
    if self.coordinator != AUTO and (match is None or not 1 <= int(match["port"]) <= 65535):
      raise ValueError(f"coordinator must be HOST:PORT (e.g. 10.0.0.1:1234) or {AUTO!r}, got {self.coordinator!r}")
    for name, low in (("num_processes", 1), ("process_id", 0), ("join_timeout", 1), ("heartbeat_timeout", 1)):
      value = getattr(self, name)
      if value is None and self.coordinator == AUTO and name in ("num_processes", "process_id"):
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
      raise ValueError(f"process_id must be below num_processes ({self.num_processes}), got {self.process_id}")

  @property
  def bound(self) -> int:
    """The longest a process waits for a missing, dead or failed one before it exits, in seconds (module docstring):
    ``max(join_timeout + JOIN_EXTRA_S, heartbeat_timeout + DETECT_EXTRA_S)``."""
    return max(self.join_timeout + JOIN_EXTRA_S, self.heartbeat_timeout + DETECT_EXTRA_S)


def initialize(config: DistributedConfig, fingerprint: Any = None) -> None:
  """Joins JAX's multi-process runtime as ``config`` says; then, with ``fingerprint``, refuses to go on unless every
  process passed an equal one (:func:`check_same`).

  Must run before anything initializes a JAX backend (``jax.devices()``, any computation); called again in the same
  program (a second workflow) it only checks that ``config`` names the same process and compares ``fingerprint``.
  On CPU the cross-process collectives are JAX's gloo implementation (selected here unless another one is
  configured). The timeouts bound every wait (module docstring); the bound is printed on stderr first.

  With ``config.coordinator == AUTO`` JAX's cluster auto-detection supplies what ``config`` leaves ``None``: under
  SLURM (``srun``; it reads ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and
  ``SLURM_LOCALID``) the first node of the step is the coordinator, on port ``JAX_COORDINATOR_PORT`` or one derived
  from the job id, ``SLURM_NTASKS`` processes, ``SLURM_PROCID`` this one, and on GPUs each process sees only GPU
  ``SLURM_LOCALID`` (so run one task per GPU); on a Cloud TPU VM the TPU metadata (one process per worker); also
  Open MPI's ``mpirun`` and Kubernetes (JAX 0.10's ``jax._src.clusters``). The joined process then says which it is
  on stderr.

  Raises:
    RuntimeError: a JAX backend is already initialized (without the runtime), or the runtime was joined as another
      process.
    ValueError: the fingerprints differ (on every process); :data:`AUTO` where JAX detects no cluster.
  """
  if not isinstance(config, DistributedConfig):
    raise ValueError(f"config must be a DistributedConfig, got {config!r}")
  if jax.distributed.is_initialized():  # a second workflow in the same program: the runtime is joined already
    if any(want is not None and want != got for want, got in ((config.num_processes, jax.process_count()),
                                                              (config.process_id, jax.process_index()))):
      raise RuntimeError(f"this program already joined as process {jax.process_index()} of {jax.process_count()}, "
                         f"not {config.process_id} of {config.num_processes}")
    if fingerprint is not None:
      check_same(fingerprint)
    return
  collectives = jax.config.jax_cpu_collectives_implementation
  if collectives in (None, "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  auto = config.coordinator == AUTO
  who = ("this process" if auto and config.process_id is None else f"process {config.process_id}") + (
      "" if config.num_processes is None else f" of {config.num_processes}")
  where = "the coordinator JAX detects (SLURM, Cloud TPU, ...)" if auto else config.coordinator
  print(f"proxjax: {who} joining {where}; every process must join within {config.join_timeout} s "
        f"(+{JOIN_EXTRA_S}), and a process silent or failed for {config.heartbeat_timeout} s (+{DETECT_EXTRA_S}) stops "
        "all of them (JAX aborts each: 'Terminating process because the JAX distributed service detected fatal "
        "errors')", file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(coordinator_address=None if auto else config.coordinator,
                               num_processes=config.num_processes, process_id=config.process_id,
                               initialization_timeout=config.join_timeout,
                               heartbeat_timeout_seconds=config.heartbeat_timeout,
                               shutdown_timeout_seconds=config.heartbeat_timeout)
  except ValueError as err:
    jax.config.update("jax_cpu_collectives_implementation", collectives)  # not joined: as it was
    if not auto or "must be defined" not in str(err) and "should be defined" not in str(err):
      raise
    raise ValueError("--coordinator auto: JAX detected no cluster here (SLURM: SLURM_JOB_ID, SLURM_STEP_NODELIST, "
                     "SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID set by srun; a Cloud TPU VM; Open MPI; Kubernetes): "
                     "give --coordinator HOST:PORT --num-processes N --process-id I") from None
  if auto:
    print(f"proxjax: joined as process {jax.process_index()} of {jax.process_count()}", file=sys.stderr, flush=True)
  if fingerprint is not None:
    check_same(fingerprint)


def _canonical(value: Any) -> Any:
  """A JSON-ready form of ``value`` that is equal on two processes exactly when the values are equal (functions by
  their qualified name, not their address)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {"__class__": type(value).__qualname__,
            **{f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
  if isinstance(value, tuple) and hasattr(value, "_asdict"):
    return {"__class__": type(value).__qualname__, **{k: _canonical(v) for k, v in value._asdict().items()}}
  if isinstance(value, Mapping):
    return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, list | tuple):
    return [_canonical(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if callable(value):
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
  return repr(value)


def fingerprint(value: Any) -> str:
  """The SHA-256 (hex) of ``value``'s canonical JSON: dataclasses, named tuples, mappings (sorted), sequences and
  scalars by value, functions by qualified name, anything else by ``repr``.

  Example:
    >>> fingerprint({"b": 1, "a": [2.0, None]}) == fingerprint({"a": [2.0, None], "b": 1})
    True
  """
  text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _differing(digest: str) -> list[int]:
  """The processes whose ``digest`` (hex) differs from process 0's: the first 16 bytes of each, all-gathered (a
  collective), so every process sees the same table."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  mine = np.frombuffer(bytes.fromhex(digest)[:16], np.uint32)
  table = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [p for p in range(len(table)) if not np.array_equal(table[p], table[0])]


def check_same(value: Any, what: str = "arguments") -> str:
  """Checks that every process passed an equal ``value`` (by :func:`fingerprint`): each contributes the first 16
  bytes of its hash to one all-gather, so every process sees the same table and all raise together.

  Returns:
    The fingerprint.

  Raises:
    ValueError: some process's value differs from process 0's (naming those processes), or the processes have
      different numbers of devices (which the exchange, and proxjax's meshes, need equal).

  Example:
    >>> len(check_same({"command": "prune"}))  # one process: nothing to differ from
    64
  """
  digest = fingerprint(value)
  if jax.process_count() == 1:
    return digest
  if len(jax.devices()) != jax.process_count() * jax.local_device_count():
    raise ValueError(f"the processes have different numbers of devices ({jax.local_device_count()} here, "
                     f"{len(jax.devices())} in all over {jax.process_count()} processes): give every process the "
                     "same number")
  differ = _differing(digest)
  if differ:
    raise ValueError(f"the {what} differ between processes: process(es) {differ} do not match process 0 (run the "
                     "same command, with the same proxjax and JAX versions, on every process; only --process-id "
                     "may differ)")
  return digest


def allgather_int(value: int) -> list[int]:
  """Every process's ``value``, in process order, on every process (a collective: every process calls it). In a
  single process, ``[value]``.

  Example:
    >>> allgather_int(3)
    [3]
  """
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)]


def broadcast_int(value: int) -> int:
  """Process 0's ``value`` on every process (a collective: every process calls it; the others' values are
  ignored). In a single process, ``value``.

  Example:
    >>> broadcast_int(7)
    7
  """
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return int(np.asarray(multihost_utils.broadcast_one_to_all(np.int64(value if is_coordinator() else 0))))


SHARED_MARKER = "proxjax-shared-check"
"""The file :func:`resume_directory` writes (then removes) to learn whether every process sees the directory."""


def resume_directory(directory: str, names: Sequence[str], resumes: bool, what: str) -> str | None:
  """Whether the processes can keep and resume a run's state in ``directory``: every process must read there what
  process 0 wrote (one file system shared by all of them).

  A collective (every process calls it with the same ``names`` and ``resumes``, e.g. derived from a value of
  process 0's, :func:`broadcast_int`). Process 0 creates ``directory`` and writes :data:`SHARED_MARKER` there with a
  fresh random token; every process then hashes the marker and the files ``names`` of ``directory`` (each file's
  bytes, or its absence) and the hashes are all-gathered; process 0 removes the marker.

  Returns:
    ``directory`` when every process's hash equals process 0's; ``None`` when one differs while ``resumes`` is false
    (nothing to resume: the run goes on without keeping state, said on stderr by every process). In a single
    process, ``directory`` (nothing is written).

  Raises:
    ValueError: a process's hash differs while ``resumes`` (process 0 holds ``what`` to resume, which that process
      does not see the same): on every process, one line naming them.
  """
  if jax.process_count() == 1:
    return directory
  marker = os.path.join(directory, SHARED_MARKER)
  token = secrets.token_hex(16)

  def write_marker() -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = f"{marker}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(token)
    os.replace(tmp, marker)

  on_coordinator(write_marker, f"writing {marker}")
  h = hashlib.sha256()
  for name in (SHARED_MARKER, *names):
    path = os.path.join(directory, name)
    try:
      with open(path, "rb") as f:
        content = f.read()
      h.update(b"file %d " % len(content) + content)
    except OSError:
      h.update(b"missing")
  differ = _differing(h.hexdigest())
  on_coordinator(lambda: os.remove(marker) if os.path.exists(marker) else None, f"removing {marker}")
  if not differ:
    return directory
  if resumes:
    raise ValueError(f"process 0 has {what} to resume in {directory}, which process(es) {differ} do not see the "
                     "same: put the state directory on a file system every process shares (--state-dir), or rerun "
                     "with --restart to start over")
  print(f"proxjax: process(es) {differ} do not see what process 0 writes in {directory} (no shared file system): "
        "no resume state is kept (a killed run starts again from the beginning); give --state-dir on a file system "
        "every process shares to keep one", file=sys.stderr, flush=True)
  return None


def process_count() -> int:
  """``jax.process_count()``: 1 unless :func:`initialize` joined several processes."""
  return jax.process_count()


def is_coordinator() -> bool:
  """Whether this is process 0 (the one that writes outputs), always true in a single process."""
  return jax.process_index() == 0


def gather(tree: Any) -> Any:
  """Every array leaf of ``tree`` as a whole NumPy array on every process.

  A leaf that this process can read whole (a host array, a fully addressable or fully replicated ``jax.Array``) is
  converted locally; a global array sharded over other processes' devices is all-gathered (a collective: every
  process must call this with the same tree, leaves in the same order; one leaf at a time, so the devices hold at
  most one whole leaf more).

  Example:
    >>> import jax.numpy as jnp
    >>> gather({"w": jnp.ones((2, 3))})["w"].shape
    (2, 3)
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def on_coordinator(fn: Callable[[], T], what: str) -> T | None:
  """Runs ``fn`` on process 0 only (e.g. writing the checkpoint), while the others wait for it; then every process
  learns whether it succeeded. Returns ``fn()`` on process 0 and ``None`` elsewhere.

  The wait is a broadcast from process 0 (a barrier): a failure of ``fn`` is re-raised on process 0, and every
  other process raises an error of the same kind (``ValueError`` for a ``ValueError``, ``OSError`` for an
  ``OSError``, else ``RuntimeError``) naming ``what``, so no process waits on a failed writer and all exit alike. In
  a single process this is ``fn()``.

  Example:
    >>> on_coordinator(lambda: "written", "writing the report")
    'written'
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  kinds: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
  result: T | None = None
  error: BaseException | None = None
  if is_coordinator():
    try:
      result = fn()
    except BaseException as err:  # pylint: disable=broad-exception-caught  (re-raised below, after the others know)
      error = err
  kind = 0 if error is None else 1 + next(i for i, k in enumerate(kinds) if isinstance(error, k) or k is RuntimeError)
  kind = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(kind))))
  if error is not None:
    raise error
  if kind:
    raise kinds[kind - 1](f"process 0 failed while {what} (its output says why); nothing else was written")
  return result
