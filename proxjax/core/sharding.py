r"""Where every array of proxjax lives on a device mesh: logical axes → mesh axes, declared once.

proxjax names the axes of its arrays logically and maps them to the axes of a :class:`jax.sharding.Mesh` with one
table, :data:`RULES`. Everything sharded in the library (checkpoint loading, the block-by-block pipeline, the layer
pruner's compiled loops, Hessian accumulation) takes its :class:`~jax.sharding.NamedSharding` from here, and the
compiled functions receive them as ``jax.jit(..., in_shardings=..., out_shardings=...)`` (what ``pjit`` became).

The layout (a mesh with axes ``("data", "model")``; ``make_mesh(8)`` is ``data=1, model=8``):

============================  =======================  ================================================
array                         logical axes             placement
============================  =======================  ================================================
linear kernel ``(d_in, d_out)``  ``("d_in", "d_out")``    outputs split over ``model``; each device holds
                                                       whole columns, i.e. whole 2:4 groups (groups run
                                                       along ``d_in``)
``H`` ``(d_in, d_in)``        ``("d_in", "d_in")``     replicated
bias ``(d_out,)``             ``("d_out",)``           split over ``model``
embedding ``(vocab, hidden)`` ``("vocab", "embed")``   vocabulary split over ``model``
norm scales ``(hidden,)``     ``("embed",)``           replicated
activations ``(batch, seq, hidden)`` ``("batch", "seq", "embed")``  batch split over **every** device
============================  =======================  ================================================

Why this layout. The prox-gradient step ``Ṽ ← prox(Ṽ − η H̃ (Ṽ − K̃₀))`` multiplies ``H̃`` by the kernel's columns and
solves the prox per group of 4 inputs of one column, so with columns (outputs) split and ``H`` replicated each device
runs the loop on its own columns with no communication except one scalar all-reduce per iteration (the number of
groups not yet 2:4: the stop is global). SparseGPT's sweep runs along the inputs of every column independently, so
the same layout needs no communication either. ``H = X Xᵀ / n`` is accumulated from activations whose batch is split
over all devices: each device adds its tokens' ``XᵀX`` and one all-reduce sums them. Outside the loops, a sharded
block's forward pass gathers each kernel as needed (fully-sharded data parallel).

A mesh axis is dropped for a dimension it does not divide (that dimension is then replicated); :func:`spec_for`
says which. The mesh uses ``AxisType.Auto`` (compiler-propagated shardings), deliberately: proxjax's compiled
functions declare their input and output shardings and XLA places the intermediates, so the same code runs on one
device and on a mesh.

Multi-host: call ``jax.distributed.initialize()`` first on every host (same program, same arguments); ``jax.devices()``
then lists every host's devices and :func:`make_mesh` builds a mesh over all of them. Every host must read the same
checkpoint and calibration data (each device only materializes its own shards; :func:`proxjax.models.load_pretrained`
with a sharding reads only the blocks of each tensor that the process's devices hold).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from proxjax.core import distributed

__all__ = [
    "RULES",
    "activation_sharding",
    "batch_on",
    "checkpoint_sharding",
    "kernel_sharding",
    "logical_axes",
    "make_mesh",
    "parse_mesh",
    "place",
    "put",
    "replicated",
    "spec_for",
    "tree_shardings",
]

MESH_AXES = ("data", "model")
"""The mesh axis names proxjax uses."""

RULES: tuple[tuple[str, Any], ...] = (
    ("d_out", "model"),
    ("d_in", None),
    ("vocab", "model"),
    ("embed", None),
    ("batch", ("data", "model")),
    ("seq", None),
)
"""Logical axis → mesh axis (a name, a tuple of names, or ``None`` for replicated). The only place they are set."""

KERNEL = ("d_in", "d_out")
HESSIAN = ("d_in", "d_in")
ACTIVATIONS = ("batch", "seq", "embed")


def make_mesh(model: int | None = None, data: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "model")`` mesh with ``AxisType.Auto`` axes.

  Args:
    model: devices along ``model`` (kernel outputs); default all devices divided by ``data``.
    data: devices along ``data`` (extra batch parallelism; kernels are replicated over it).
    devices: the devices to use; default ``jax.devices()``.

  Raises:
    ValueError: ``data * model`` is not the number of devices.

  Example:
    >>> from proxjax.core.sharding import make_mesh
    >>> make_mesh().shape["data"]
    1
  """
  devices = list(jax.devices() if devices is None else devices)
  if not (isinstance(data, int) and data >= 1) or (model is not None and not (isinstance(model, int) and model >= 1)):
    raise ValueError(f"mesh sizes must be positive ints, got data={data!r}, model={model!r}")
  if model is None:
    if len(devices) % data:
      raise ValueError(f"data={data} does not divide the {len(devices)} devices")
    model = len(devices) // data
  if data * model != len(devices):
    raise ValueError(f"a data={data} x model={model} mesh needs {data * model} devices, there are {len(devices)} "
                     "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax fakes N)")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, model), MESH_AXES,
              axis_types=(AxisType.Auto, AxisType.Auto))


def parse_mesh(text: str, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh from a command-line string: ``"auto"`` (all devices on ``model``), ``"8"`` (model=8) or
  ``"data=2,model=4"``.

  Example:
    >>> from proxjax.core.sharding import parse_mesh
    >>> dict(parse_mesh("model=1").shape)
    {'data': 1, 'model': 1}
  """
  text = text.strip()
  if text == "auto":
    return make_mesh(devices=devices)
  if re.fullmatch(r"\d+", text):
    return make_mesh(model=int(text), devices=devices)
  sizes: dict[str, int] = {}
  for part in text.split(","):
    key, sep, value = part.partition("=")
    key = key.strip()
    if not sep or key not in MESH_AXES or not value.strip().isdigit() or key in sizes:
      raise ValueError(f"cannot read mesh {text!r}: expected 'auto', a device count like '8', or "
                       "'data=D,model=M'")
    sizes[key] = int(value)
  return make_mesh(model=sizes.get("model"), data=sizes.get("data", 1), devices=devices)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The :class:`PartitionSpec` of an array with these logical axes, by :data:`RULES`.

  A mesh axis of size 1 is left out, and a dimension the mesh axes do not divide is replicated (never an error: a
  tiny model's odd sizes still run, just less sharded).

  Example:
    >>> from proxjax.core.sharding import make_mesh, spec_for
    >>> tuple(spec_for(("d_in", "d_out"), (8, 12), make_mesh()))  # one device: nothing to split
    (None, None)
  """
  if len(logical) != len(shape):
    raise ValueError(f"{len(logical)} logical axes {tuple(logical)} for an array of shape {tuple(shape)}")
  rules = dict(RULES)
  out = []
  for name, size in zip(logical, shape):
    if name is not None and name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)
      axes = axes if axes and size % _axis_size(mesh, axes) == 0 else None
      axes = axes[0] if axes is not None and len(axes) == 1 else axes
    out.append(axes)
  return P(*out)


def named(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  """``NamedSharding(mesh, spec_for(logical, shape, mesh))``."""
  return NamedSharding(mesh, spec_for(logical, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding (``H``, scalars, norm scales)."""
  return NamedSharding(mesh, P())


def kernel_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """A linear kernel ``(d_in, d_out)``: outputs over ``model``.

  Example:
    >>> from proxjax.core.sharding import kernel_sharding, make_mesh
    >>> tuple(kernel_sharding(make_mesh(), (8, 12)).spec)
    (None, None)
  """
  return named(mesh, KERNEL, shape)


def activation_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Activations ``(batch, ...)``: batch over every device, the rest replicated."""
  return named(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def logical_axes(path: Sequence[Any], shape: Sequence[int]) -> tuple[str | None, ...]:
  """The logical axes of a model parameter from its path (NNX attribute names) and shape.

  ``kernel`` (2-D) → ``("d_in", "d_out")``; ``embedding`` → ``("vocab", "embed")``; ``bias`` → ``("d_out",)``;
  anything else (norm scales, ...) → ``("embed",)`` for 1-D and replicated otherwise.

  Example:
    >>> from proxjax.core.sharding import logical_axes
    >>> logical_axes(("model", "layers", 0, "mlp", "up_proj", "kernel"), (576, 1536))
    ('d_in', 'd_out')
  """
  names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
  names = [n for n in names if n != "value"]
  leaf = names[-1] if names else ""
  if leaf == "kernel" and len(shape) == 2:
    return KERNEL
  if leaf == "embedding" and len(shape) == 2:
    return ("vocab", "embed")
  if leaf == "bias" and len(shape) == 1:
    return ("d_out",)
  if len(shape) == 1:
    return ("embed",)
  return (None,) * len(shape)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """The declared :class:`NamedSharding` of every array leaf of a parameter pytree (an ``nnx.State`` or dict).

  Example:
    >>> import jax.numpy as jnp
    >>> from proxjax.core.sharding import make_mesh, tree_shardings
    >>> tuple(tree_shardings({"up": {"kernel": jnp.zeros((8, 12))}}, make_mesh())["up"]["kernel"].spec)
    (None, None)
  """
  return jax.tree_util.tree_map_with_path(lambda p, x: named(mesh, logical_axes(p, x.shape), x.shape), tree)


def checkpoint_sharding(mesh: Mesh) -> Callable[[tuple[Any, ...], tuple[int, ...]], NamedSharding]:
  """The ``sharding(path, shape)`` callable for :func:`proxjax.models.load_pretrained`: each tensor is placed
  straight into its declared sharding as it is read.

  Example:
    >>> from proxjax.core.sharding import checkpoint_sharding, make_mesh
    >>> tuple(checkpoint_sharding(make_mesh())(("lm_head", "kernel"), (8, 12)).spec)
    (None, None)
  """
  return lambda path, shape: named(mesh, logical_axes(path, shape), shape)


def put(x: Any, target: Any) -> jax.Array:
  """``jax.device_put(x, target)`` for host data ``x`` that every process holds whole (a tensor read from a
  checkpoint, a freshly initialised parameter).

  Onto a sharding whose devices span several processes, ``jax.device_put`` all-gathers the copies to check that every
  process passed the same values (a full extra pass over the network per tensor); here each process instead builds
  only its own devices' shards from its copy (``jax.make_array_from_callback``). Otherwise it is ``jax.device_put``.

  Example:
    >>> import numpy as np
    >>> from proxjax.core.sharding import make_mesh, named, put
    >>> mesh = make_mesh()
    >>> a = put(np.arange(8.0).reshape(2, 4), named(mesh, ("d_in", "d_out"), (2, 4)))
    >>> a.shape, tuple(a.sharding.spec) == tuple(named(mesh, ("d_in", "d_out"), (2, 4)).spec)
    ((2, 4), True)
  """
  if (target is None or not isinstance(target, jax.sharding.Sharding) or target.is_fully_addressable
      or (isinstance(x, jax.Array) and not x.is_fully_addressable)):  # already global: a reshard
    return jax.device_put(x, target)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def batch_on(x: Any, mesh: Mesh | None = None) -> jax.Array:
  """A host batch ``x`` (rows first) as a step's input: ``jnp.asarray(x)`` without a mesh; on ``mesh``, one array
  split along its rows over every device (replicated when they do not divide it), each process building only its own
  devices' rows from its copy (:func:`put`: every process passes the same ``x``).

  Example:
    >>> import numpy as np
    >>> batch_on(np.ones((2, 3), np.int32), make_mesh()).shape
    (2, 3)
  """
  if mesh is None:
    return jax.numpy.asarray(x)
  x = np.asarray(x)
  return put(x, activation_sharding(mesh, x.shape))


def host_device() -> jax.Device:
  """This process's host device: its first CPU device (across processes each has its own; ``jax.devices("cpu")[0]``
  would be process 0's)."""
  return jax.local_devices(backend="cpu")[0]


def place(module: Any, mesh: Mesh | None, variables: Any = None) -> None:
  """Moves an NNX module's variables (default: its ``nnx.Param`` s), in place, to their declared shardings on
  ``mesh`` (``None``: to the host, i.e. this process's first CPU device, :func:`host_device`; a variable sharded
  over several processes' devices is gathered whole into every process, a collective all of them take part in).

  ``variables`` is an NNX filter, e.g. ``nnx.optimizer.OptState`` to place an ``nnx.Optimizer`` 's moments like the
  params they belong to (their paths end in the same names).

  Example:
    >>> import flax.nnx as nnx
    >>> from proxjax.core.sharding import make_mesh, place
    >>> layer = nnx.Linear(8, 12, rngs=nnx.Rngs(0))
    >>> place(layer, make_mesh())
    >>> tuple(layer.kernel[...].sharding.spec)
    (None, None)
  """
  from flax import nnx  # local: keeps this module importable without building models

  state = nnx.state(module, nnx.Param if variables is None else variables)
  if mesh is None:  # an array sharded over other processes' devices is gathered first (a collective)
    host = host_device()
    whole = lambda x: x if not isinstance(x, jax.Array) or x.is_fully_addressable else distributed.gather(x)
    nnx.update(module, jax.tree.map(lambda x: jax.device_put(whole(x), host), state))
    return
  target = tree_shardings(state, mesh)
  if mesh.is_multi_process:  # each process builds its own shards (see put)
    nnx.update(module, jax.tree.map(put, state, target))
    return
  nnx.update(module, jax.device_put(state, target))
