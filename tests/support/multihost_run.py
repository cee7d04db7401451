"""One process of the multi-process tests (tests/test_multihost.py): run with 2 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set by the caller before JAX is imported).

``python -m tests.support.multihost_run cli ARGS...``: the ``proxjax`` command line, exit code as its own.

``python -m tests.support.multihost_run join ARGS...``: joins the other processes as ``proxjax ARGS...`` would (the
same arguments compared), prints ``joined`` and waits to be killed.

``python -m tests.support.multihost_run session PROCESS_ID PORT WORK CHECKPOINT CORPUS``: the session of checks one
pair of processes runs together (one JAX start-up for all of them), writing its results under ``WORK``:

1. ``proxjax prune CHECKPOINT WORK/wanda --method wanda ...`` across the two processes (process 0 writes);
2. ``proxjax eval WORK/wanda --json WORK/eval.json`` across them;
3. :func:`proxjax.pipeline.prune_model` with magnitude on the checkpoint loaded onto the 4-device global mesh: each
   process gathers the pruned kernels and writes ``WORK/magnitude-{PROCESS_ID}.npz``;
4. ``WORK/session-{PROCESS_ID}.json``: what it ran, its CPU seconds and wall time.
"""

from __future__ import annotations

import functools
import importlib
import json
import resource
import sys
import time

ARGS = ("--calibration", "{corpus}/calib.txt", "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--quiet")
"""The calibration of tests/support/cli.py's ``prune_cli`` (the single-process reference), as a template."""


def distributed_flags(process_id: int, port: int, join: int = 60, heartbeat: int = 20) -> list[str]:
  """``--coordinator ... --process-id`` for one of 2 processes on this machine."""
  return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
          "--join-timeout", str(join), "--heartbeat-timeout", str(heartbeat)]


def session(process_id: int, port: int, work: str, checkpoint: str, corpus: str) -> int:
  from proxjax import cli  # noqa: PLC0415

  import jax  # noqa: PLC0415

  compiles: list[str] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  t0 = time.perf_counter()
  cpu = [time.process_time()]
  counts = []
  flags = distributed_flags(process_id, port)
  calibration = [a.format(corpus=corpus) for a in ARGS]
  done = {}
  code = cli.main(["prune", checkpoint, f"{work}/wanda", "--method", "wanda", *calibration, *flags])
  done["prune"] = code
  seconds = {"prune": time.perf_counter() - t0}
  cpu.append(time.process_time())
  counts.append(len(compiles))
  if code == 0:
    done["eval"] = cli.main(["eval", f"{work}/wanda", "--dataset", f"{corpus}/eval.txt", "--seqlen", "32", "--quiet",
                             "--max-windows", "16", "--json", f"{work}/eval.json", *flags])
    seconds["eval"] = time.perf_counter() - t0 - sum(seconds.values())
    cpu.append(time.process_time())
    counts.append(len(compiles))

  import numpy as np  # noqa: PLC0415

  from proxjax import data  # noqa: PLC0415
  from proxjax.core import distributed, sharding  # noqa: PLC0415
  from proxjax.models import load_pretrained  # noqa: PLC0415
  from proxjax.pipeline import prune_model  # noqa: PLC0415

  mesh = sharding.make_mesh()
  model = load_pretrained(checkpoint, sharding=sharding.checkpoint_sharding(mesh))
  tokenizer = data.load_tokenizer(checkpoint)
  ids = data.calibration_windows(tokenizer, data.load_documents(f"{corpus}/calib.txt", split="calibration"),
                                 nsamples=6, seqlen=32, seed=0, mode="packed")
  prune_model(model, ids, "magnitude", batch_size=4, mesh=mesh, progress=False)
  kernels = {f"{b}.{name}": functools.reduce(getattr, name.split("."), block).kernel[...]
             for b, block in enumerate(model.model.layers)
             for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
  sharded = sorted(k for k, v in kernels.items() if not v.is_fully_addressable)
  np.savez(f"{work}/magnitude-{process_id}.npz", **distributed.gather(kernels))
  seconds["magnitude"] = time.perf_counter() - t0 - sum(seconds.values())
  usage = resource.getrusage(resource.RUSAGE_SELF)
  with open(f"{work}/session-{process_id}.json", "w") as f:
    json.dump({"exit": done, "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
               "processes": jax.process_count(), "sharded_across_processes": sharded,
               "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - t0, "seconds": seconds,
               "cpu_phases": [b - a for a, b in zip(cpu, cpu[1:] + [time.process_time()])], "cpu_at_start": cpu[0],
               "compiles": [b - a for a, b in zip([0] + counts, counts + [len(compiles)])]}, f)
  return max(done.values())


def main(argv: list[str]) -> int:
  if argv[0] == "cli":
    from proxjax import cli  # noqa: PLC0415
    return cli.main(argv[1:])
  if argv[0] == "join":
    command_line = importlib.import_module("proxjax.cli.main")  # the module (proxjax.cli.main is also the function)
    command_line._join(command_line.build_parser().parse_args(argv[1:]))
    print("joined", flush=True)
    time.sleep(600)
    return 1
  if argv[0] == "session":
    process_id, port, work, checkpoint, corpus = argv[1:]
    return session(int(process_id), int(port), work, checkpoint, corpus)
  raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
