"""proxjax across processes, for real: JAX's multi-process runtime with 2 processes x 2 fake CPU devices on this
machine (one 4-device global mesh, gloo collectives), against the single-process results.

Every group of processes is started once, all at the same time, by the module fixture (tests/support/multihost_run.py
is what each process runs): one pair runs ``proxjax prune`` (Wanda), ``proxjax eval`` and ``prune_model`` (magnitude)
together; a pair with different arguments; a pair of which one is killed; a pair evaluating a checkpoint with a NaN
only process 1 reads; and one process whose partner never starts. This process computes the single-device references meanwhile (``prune`` and ``eval`` through the same command
line). Compiles: in each process of the pair, one program per distinct kernel shape (2) and method for pruning, the
block forward and Hessian programs of the stages, the embedding and the logits (each once per process).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from proxjax import cli
from proxjax.core.distributed import DETECT_EXTRA_S, JOIN_EXTRA_S
from tests.support.agreement import assert_iterative_agreement
from proxjax.models.hf import check_sparsity
from tests.support.cli import prune_cli
from tests.support.multihost_run import (CACHED_PPL, FINETUNE, HISTORY, PROSPARSE, STOPPED, TASKS, by_path,
                                         distributed_flags, harness_requests, proxsparse_args, proxsparse_run)

REPO = pathlib.Path(__file__).resolve().parents[1]
HEARTBEAT = 5
"""``--heartbeat-timeout`` of the pair whose process 1 is killed."""
JOIN = 5
"""``--join-timeout`` of the process whose partner never starts."""
SLACK = 10.0
"""Seconds allowed beyond the stated bound for a loaded 2-core machine."""
LIMIT = 600.0
"""No process of these tests may run longer (they are killed then, and the tests fail)."""


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


class Process:
  """One started process: its output file, when it printed what, when it ended and how."""

  def __init__(self, name: str, args: list[str], log: pathlib.Path, env: dict[str, str] | None = None):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "SLURM_"))}, **(env or {})}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
    self.name, self.log = name, log
    with open(log, "w") as f:
      self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.multihost_run", *args], cwd=REPO, env=env,
                                   stdout=f, stderr=subprocess.STDOUT)
    self.seen: dict[str, float] = {}
    self.ended: float | None = None
    self.killed: float | None = None
    self.returncode: int | None = None
    self.cpu_s: float | None = None  # user + system CPU seconds, once ended

  @property
  def output(self) -> str:
    return self.log.read_text(errors="replace")

  def poll(self, watch: tuple[str, ...]) -> bool:
    """Notes when each of ``watch`` first appears in the output and when the process ends; True once it ended."""
    now = time.monotonic()
    text = self.output
    for word in watch:
      if word not in self.seen and word in text:
        self.seen[word] = now
    if self.ended is None:
      pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
      if pid:
        self.ended, self.returncode = now, os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.proc.returncode = self.returncode  # reaped here: Popen must not wait for it again
    return self.ended is not None


def _watch(procs: dict[str, Process]) -> None:
  """Polls every process until all ended (at most ``LIMIT`` seconds), noting when they print what and end, and kills
  process 1 of the ``killed`` pair as soon as it has joined."""
  deadline = time.monotonic() + LIMIT
  while time.monotonic() < deadline:
    for p in procs.values():
      p.poll(("joining", "joined", "pruning"))
    victim = procs["killed1"]
    if victim.killed is None and "joined" in victim.seen:  # it joined, the arguments were compared: process 0 goes on
      victim.proc.kill()
      victim.killed = time.monotonic()
    if all(p.ended is not None for p in procs.values()):
      return
    time.sleep(0.1)


@pytest.fixture(scope="module")
def runs(checkpoint, corpus, tmp_path_factory) -> dict[str, object]:
  work = tmp_path_factory.mktemp("multihost")
  ckpt, text = str(checkpoint), str(corpus)
  session, mismatch, killed, alone, slurm, nan = _free_ports(6)
  prune = ["cli", "prune", ckpt, "--method", "wanda", "--calibration", f"{text}/calib.txt", "--seqlen", "32",
           "--batch-size", "4", "--quiet"]
  procs = {
      **{f"session{i}": Process(f"session{i}", ["session", str(i), str(session), str(work), ckpt, text],
                                work / f"session{i}.log") for i in (0, 1)},
      **{f"mismatch{i}": Process(f"mismatch{i}", [*prune, str(work / "mismatch"), "--nsamples", str(6 + i),
                                                  *distributed_flags(i, mismatch, join=60, heartbeat=20)],
                                 work / f"mismatch{i}.log") for i in (0, 1)},
      **{f"killed{i}": Process(f"killed{i}", ["join" if i else "cli", *prune[1:], str(work / "killed"),
                                              "--nsamples", "6",
                                              *distributed_flags(i, killed, join=60, heartbeat=HEARTBEAT)],
                               work / f"killed{i}.log") for i in (0, 1)},
      **{f"slurm{i}": Process(f"slurm{i}", ["detect", str(work / f"slurm-{i}.json"), *prune[1:], str(work / "slurm"),
                                            "--coordinator", "auto", "--join-timeout", "60"], work / f"slurm{i}.log",
                              env=slurm_env(i, slurm)) for i in (0, 1)},
      **{f"nan{i}": Process(f"nan{i}", ["cli", "eval", str(_nan_checkpoint(checkpoint, work / "nan-ckpt")),
                                        "--dataset", f"{text}/eval.txt", "--seqlen", "32", "--quiet",
                                        "--max-windows", "16", "--json", str(work / "nan.json"),
                                        *distributed_flags(i, nan)], work / f"nan{i}.log") for i in (0, 1)},
      "nocluster": Process("nocluster", [*prune, str(work / "nocluster"), "--coordinator", "auto"],
                           work / "nocluster.log"),
      "alone": Process("alone", [*prune, str(work / "alone"), "--nsamples", "6",
                                 *distributed_flags(0, alone, join=JOIN, heartbeat=HEARTBEAT)], work / "alone.log"),
  }
  watcher = threading.Thread(target=_watch, args=(procs,), daemon=True)  # timestamps while this process works
  watcher.start()
  # the single-process references, computed while the processes run
  reference = tmp_path_factory.mktemp("reference")
  cpu = resource.getrusage(resource.RUSAGE_SELF)
  assert prune_cli(checkpoint, corpus, reference / "wanda", "--method", "wanda") == 0
  assert cli.main(["eval", str(reference / "wanda"), "--dataset", str(corpus / "eval.txt"), "--seqlen", "32",
                   "--quiet", "--max-windows", "16", "--json", str(reference / "eval.json")]) == 0
  after = resource.getrusage(resource.RUSAGE_SELF)
  reference_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
  watcher.join()
  for p in procs.values():
    if p.ended is None:
      p.proc.kill()
      p.proc.wait()
  print("CPU seconds:", {"reference": round(reference_cpu, 1), **{n: p.cpu_s and round(p.cpu_s, 1)
                                                                  for n, p in procs.items()}})
  killed, alone = procs["killed0"], procs["alone"]
  if killed.ended and procs["killed1"].killed and alone.ended and "joining" in alone.seen:
    print(f"exits: killed pair {killed.ended - procs['killed1'].killed:.1f} s after the kill (exit "
          f"{killed.returncode}); alone {alone.ended - alone.seen['joining']:.1f} s after it began to join (exit "
          f"{alone.returncode})")
  return {"work": work, "reference": reference, **procs}


NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"
"""The tensor of :func:`_nan_checkpoint` holding one NaN, in its last row (Hugging Face layout ``(d_out, d_in)``)."""


def _nan_checkpoint(checkpoint: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """A copy of ``checkpoint`` (the other files linked) whose :data:`NAN_TENSOR` holds one NaN in its last row: on the
  4-device mesh over both processes only the last device, process 1's, holds (and reads) that row."""
  if not path.exists():
    path.mkdir()
    for f in checkpoint.iterdir():
      if f.name != "model.safetensors":
        (path / f.name).symlink_to(f)
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights[NAN_TENSOR][-1, 3] = np.nan
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
  return path


def slurm_env(process_id: int, port: int) -> dict[str, str]:
  """What ``srun --ntasks=2`` sets for task ``process_id`` on one node, as JAX's SLURM detection reads it (JAX 0.10's
  ``jax._src.clusters.slurm_cluster``), with ``JAX_COORDINATOR_PORT`` for a free port (JAX derives one from the job
  id otherwise)."""
  return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
          "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id), "SLURM_STEP_NUM_NODES": "1",
          "JAX_COORDINATOR_PORT": str(port)}


def _check_ended(p: Process) -> None:
  if p.ended is None:
    pytest.fail(f"{p.name} ran longer than {LIMIT} s and was killed:\n{p.output[-5000:]}")


def _ok(p: Process) -> None:
  _check_ended(p)
  assert p.returncode == 0, f"{p.name} exited with {p.returncode}:\n{p.output[-5000:]}"


def test_prune_across_two_processes_equals_one_process(runs):
  for i in (0, 1):
    _ok(runs[f"session{i}"])
  out, ref = runs["work"] / "wanda", runs["reference"] / "wanda"
  many, one = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  assert many.keys() == one.keys()
  for name, value in one.items():
    np.testing.assert_array_equal(many[name], value, err_msg=name)  # bitwise: Wanda's masks and the kept weights
  rows = check_sparsity(str(out))
  assert len(rows) == 14 and all(r["ok"] for r in rows)
  report = json.loads((out / "proxjax-report.json").read_text())
  assert report["processes"] == 2 and report["mesh"] == {"data": 1, "model": 4}
  assert json.loads((out / "proxjax.json").read_text())["processes"] == 2
  # written once, by process 0: the checkpoint, its report and plot, nothing left beside it (no second save's
  # temporary directory, no lock)
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["config.json", "generation_config.json", "model.safetensors", "proxjax-layer-losses.png",
       "proxjax-report.json", "proxjax.json", "tokenizer.json", "tokenizer_config.json"])
  assert not [p.name for p in runs["work"].iterdir() if p.name.startswith("wanda") and p.name != "wanda"]
  for i in (0, 1):
    session = json.loads((runs["work"] / f"session-{i}.json").read_text())
    assert (session["processes"], session["devices"], session["local_devices"]) == (2, 4, 2)


def test_offloaded_prune_across_two_processes_equals_one_process(runs):
  """``--offload`` across processes: every process holds the model in its host memory, each block goes onto the
  4-device global mesh while it is pruned and comes back whole to every process; the checkpoint process 0 writes is
  the single-process one, bit for bit."""
  for i in (0, 1):
    _ok(runs[f"session{i}"])
    session = json.loads((runs["work"] / f"session-{i}.json").read_text())
    assert session["exit"]["offload"] == 0, session
  out, ref = runs["work"] / "offloaded-wanda", runs["reference"] / "wanda"
  many, one = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  assert many.keys() == one.keys()
  for name, value in one.items():
    np.testing.assert_array_equal(many[name], value, err_msg=name)
  assert all(r["ok"] for r in check_sparsity(str(out)))
  report = json.loads((out / "proxjax-report.json").read_text())
  assert report["processes"] == 2 and report["offload"] and report["mesh"] == {"data": 1, "model": 4}


def test_eval_across_two_processes_equals_one_process(runs):
  for i in (0, 1):
    _ok(runs[f"session{i}"])
  many = json.loads((runs["work"] / "eval.json").read_text())
  one = json.loads((runs["reference"] / "eval.json").read_text())
  assert (many["windows"], many["predicted_tokens"]) == (one["windows"], one["predicted_tokens"]) == (16, 16 * 31)
  assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
  printed = [re.findall(r"^perplexity\s+: (\S+)$", runs[f"session{i}"].output, re.M) for i in (0, 1)]
  assert printed[0] == printed[1] and len(printed[0]) == 1  # every process computed the same number


def test_each_process_reads_only_its_blocks_of_the_checkpoint(runs, checkpoint):
  """Loading onto the 4-device global mesh, each process reads (``get_slice``) only the blocks its 2 devices hold:
  half the rows of every projection, of the embeddings and of the head (disjoint between the processes, together the
  whole tensor), and the replicated norm scales whole."""
  for i in (0, 1):
    _ok(runs[f"session{i}"])
  sizes = {k: v.nbytes for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
  reads = [json.loads((runs["work"] / f"reads-{i}.json").read_text()) for i in (0, 1)]
  rows: list[dict[str, set[int]]] = [{}, {}]
  for i in (0, 1):
    assert all(ranges is not None for _, ranges, _ in reads[i]), "a whole-tensor read (get_tensor)"
    got: dict[str, int] = {}
    for name, ranges, nbytes in reads[i]:
      got[name] = got.get(name, 0) + nbytes
      assert all([a, b] == [0, n] for (a, b), n in zip(ranges[1:], _shape(checkpoint, name)[1:])), name  # whole rows
      rows[i].setdefault(name, set()).update(range(*ranges[0]))
    assert got.keys() == sizes.keys()
    for name, nbytes in got.items():
      whole = "layernorm" in name or name == "model.norm.weight"
      assert nbytes == (sizes[name] if whole else sizes[name] // 2), (i, name, nbytes, sizes[name])
    assert sum(got.values()) < 0.6 * sum(sizes.values())  # the norms are a small part of the weights
  for name in sizes:
    n = _shape(checkpoint, name)[0]
    if "layernorm" in name or name == "model.norm.weight":
      assert rows[0][name] == rows[1][name] == set(range(n)), name
    else:
      assert not rows[0][name] & rows[1][name] and rows[0][name] | rows[1][name] == set(range(n)), name


def _shape(checkpoint, name: str) -> list[int]:
  from safetensors import safe_open  # noqa: PLC0415

  with safe_open(str(checkpoint / "model.safetensors"), framework="numpy") as f:
    return list(f.get_slice(name).get_shape())


def test_prune_model_magnitude_across_two_processes(runs, checkpoint):
  for i in (0, 1):
    _ok(runs[f"session{i}"])
  session = json.loads((runs["work"] / "session-0.json").read_text())
  assert len(session["sharded_across_processes"]) == 14  # every kernel's columns were split over both processes
  kernels = [dict(np.load(runs["work"] / f"magnitude-{i}.npz")) for i in (0, 1)]
  dense = load_file(str(checkpoint / "model.safetensors"))
  for name, value in kernels[0].items():
    np.testing.assert_array_equal(kernels[1][name], value, err_msg=name)
    w = dense[f"model.layers.{name}.weight"].T  # (d_in, d_out), groups of 4 along d_in
    groups = np.abs(w).reshape(-1, 4, w.shape[1])
    keep = np.argsort(-groups, axis=1, kind="stable")[:, :2]  # the 2 largest |w| of each group (no ties here)
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=1)
    np.testing.assert_array_equal(value, np.where(mask.reshape(w.shape), w, 0), err_msg=name)


def test_a_failed_write_on_process_0_fails_every_process(runs):
  for i in (0, 1):
    _ok(runs[f"session{i}"])
  failures = [json.loads((runs["work"] / f"session-{i}.json").read_text())["failure"] for i in (0, 1)]
  assert failures[0].startswith("FileNotFoundError: ") and "no-such-folder" in failures[0]
  assert failures[1] == ("OSError: process 0 failed while writing a file (its output says why); nothing else was "
                         "written")


def test_prune_model_resumes_across_processes(runs):
  """``prune_model`` with a ``state_dir`` every process sees: process 0 wrote every block, and a second call resumed
  every process from that state (every block) to the same kernels, bitwise; the state then moved to ``state-0``
  (each process given ``state-PROCESS_ID``, as without a shared file system) is refused on every process, and
  process 1 wrote nothing."""
  for i in (0, 1):
    _ok(runs[f"session{i}"])
    session = json.loads((runs["work"] / f"session-{i}.json").read_text())
    assert session["resume"] == {"resumed_blocks": [0, 1], "equal": True}
    assert session["state_dir"] == (
        f"process 0 has 2 finished block(s) to resume in {runs['work'] / f'state-{i}'}, which process(es) [1] do not "
        "see the same: put the state directory on a file system every process shares (--state-dir), or rerun with "
        "--restart to start over")
  assert sorted(p.name for p in (runs["work"] / "state-0").iterdir()) == [
      "block_0000.json", "block_0000.safetensors", "block_0001.json", "block_0001.safetensors", "run.json"]
  assert not (runs["work"] / "state-1").exists() and not (runs["work"] / "state").exists()


def test_coordinator_auto_detects_slurm(runs):
  """``--coordinator auto`` with SLURM's variables (2 tasks on one node; no --num-processes, no --process-id): JAX's
  detection joins them as processes 0 and 1 of 2 over all 4 devices, the arguments compared as usual."""
  for i in (0, 1):
    p = runs[f"slurm{i}"]
    _ok(p)
    assert json.loads((runs["work"] / f"slurm-{i}.json").read_text()) == {"process": i, "processes": 2, "devices": 4}
    assert f"proxjax: joined as process {i} of 2" in p.output
    assert "joining the coordinator JAX detects (SLURM, Cloud TPU, ...)" in p.output


def test_coordinator_auto_without_a_cluster_exits_2(runs):
  p = runs["nocluster"]
  _check_ended(p)
  assert p.returncode == 2, p.output[-3000:]
  assert "error: --coordinator auto: JAX detected no cluster here (SLURM: SLURM_JOB_ID" in p.output
  assert not (runs["work"] / "nocluster").exists()


def test_a_nan_only_one_process_reads_fails_every_process(runs):
  """A NaN in a row that only process 1 reads (:func:`_nan_checkpoint`): ``proxjax eval`` exits 2 on both processes
  (neither waits for the other: a hang would end in JAX's abort, exit 134, or the fixture's kill), process 1 naming
  the tensor in the part it read, process 0 naming process 1; nothing is evaluated or written."""
  outputs = {}
  for i in (0, 1):
    p = runs[f"nan{i}"]
    _check_ended(p)
    assert p.returncode == 2, p.output[-3000:]
    outputs[i] = p.output
  assert f"{NAN_TENSOR} (in model.safetensors) has 1 non-finite value(s) in the part this process read" in outputs[1]
  assert "process(es) [1] found bad tensors in the parts of the weights they read (their output lists them)" in (
      outputs[0])
  assert "non-finite value(s)" not in outputs[0] and "process(es) [" not in outputs[1]
  assert "perplexity" not in outputs[0] + outputs[1] and not (runs["work"] / "nan.json").exists()


def test_mismatched_arguments_are_refused(runs):
  for i in (0, 1):
    p = runs[f"mismatch{i}"]
    _check_ended(p)
    assert p.returncode == 2, p.output[-3000:]
    assert "error: the arguments differ between processes: process(es) [1] do not match process 0" in p.output
    assert "pruning" not in p.seen  # refused right after joining, before loading anything
  assert not (runs["work"] / "mismatch").exists()


def test_a_killed_process_stops_the_other_within_the_bound(runs):
  victim, survivor = runs["killed1"], runs["killed0"]
  _check_ended(survivor)
  assert victim.killed is not None, f"process 1 never joined:\n{victim.output[-3000:]}"
  assert survivor.returncode != 0
  assert survivor.ended - victim.killed <= HEARTBEAT + DETECT_EXTRA_S + SLACK, survivor.ended - victim.killed
  assert "another task died" in survivor.output, survivor.output[-3000:]
  assert f"a process silent or failed for {HEARTBEAT} s (+{DETECT_EXTRA_S}) stops all of them" in survivor.output
  assert not (runs["work"] / "killed").exists()


def test_a_process_that_never_joins_stops_the_other_within_the_bound(runs):
  p = runs["alone"]
  _check_ended(p)
  assert p.returncode != 0
  assert "joining" in p.seen, p.output[-3000:]
  waited = p.ended - p.seen["joining"]
  assert JOIN <= waited <= JOIN + JOIN_EXTRA_S + SLACK, waited
  assert "another task died" in p.output or "DEADLINE_EXCEEDED" in p.output, p.output[-3000:]
  assert not (runs["work"] / "alone").exists()


# ------------------------------------------------------------------------------------- arguments, in this process --


@pytest.mark.parametrize("argv,message", [
    (["--coordinator", "127.0.0.1:1234"], "--coordinator, --num-processes and --process-id go together"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "coordinator must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "process_id must be below num_processes"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--join-timeout", "0"],
     "join_timeout must be an int >= 1"),
])
def test_bad_distributed_flags_exit_2(argv, message, checkpoint, corpus, tmp_path, capsys):
  assert prune_cli(checkpoint, corpus, tmp_path / "out", "--method", "magnitude", *argv) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["finetune"], ["proxsparse", "--lam1", "0.1"], ["prosparse"]])
def test_training_commands_take_the_distributed_flags(command, checkpoint, tmp_path, capsys):
  """The training commands parse ``--coordinator/--num-processes/--process-id`` (and ``--mesh``) and check them like
  ``prune`` before joining (a bad set exits 2, nothing started)."""
  argv = [command[0], str(checkpoint), str(tmp_path / "out"), *command[1:], "--mesh", "auto"]
  assert cli.main([*argv, "--coordinator", "127.0.0.1:1", "--num-processes", "2"]) == 2
  assert "--coordinator, --num-processes and --process-id go together" in capsys.readouterr().err
  assert cli.main([*argv, "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"]) == 2
  assert "process_id must be below num_processes" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_fingerprint_is_by_value():
  from proxjax.core.distributed import fingerprint
  from proxjax.workflows.config import EvalConfig

  assert fingerprint({"f": test_fingerprint_is_by_value, "c": EvalConfig("lee")}) == fingerprint(
      {"c": EvalConfig("lee"), "f": test_fingerprint_is_by_value})  # a function by its name, not its address
  assert fingerprint(EvalConfig("lee", seqlen=64)) != fingerprint(EvalConfig("lee", seqlen=65))
  assert fingerprint([1, 2]) != fingerprint([2, 1])


# ------------------------------------------------------------------------------------------------ slow: iterative --


def _wait(procs: list[Process], limit: float = LIMIT) -> None:
  deadline = time.monotonic() + limit
  while time.monotonic() < deadline and not all(p.poll(()) for p in procs):
    time.sleep(0.2)
  for p in procs:
    if p.ended is None:
      p.proc.kill()
      p.proc.wait()


@pytest.mark.slow
def test_sparsegpt_and_prox_across_two_processes_match_one_process(checkpoint, corpus, tmp_path):
  """``prune_model`` with SparseGPT and prox (defaults: FISTA, CG refinement) across 2 processes x 2 devices, by the
  mesh tests' criterion for iterative methods (tests/support/agreement.py: >= 99.9 % of each kernel's mask; each
  layer's local loss within 1e-5 relative where the masks are identical, 1 % where a near-tie group went the other way;
  global reductions round differently)."""
  from proxjax.models import load_pretrained
  from proxjax.pipeline import prune_model
  from tests.support.multihost_run import calibration_ids, kernels

  (port,) = _free_ports(1)
  names = ("sparsegpt", "prox")
  procs = [Process(f"methods{i}", ["methods", str(i), str(port), str(tmp_path), str(checkpoint), str(corpus),
                                   ",".join(names)], tmp_path / f"methods{i}.log") for i in (0, 1)]
  ids = calibration_ids(str(checkpoint), str(corpus))
  reference = {}
  for method in names:  # the single-device runs, while the processes run
    model = load_pretrained(str(checkpoint))
    result = prune_model(model, ids, method, batch_size=4, progress=False)
    reference[method] = ({k: np.asarray(v) for k, v in kernels(model).items()},
                         {f"{r.block}.{r.name}": r.loss_after_refine for r in result.layers})
  _wait(procs)
  for p in procs:
    _ok(p)
  for method in names:
    ref_kernels, ref_losses = reference[method]
    for i in (0, 1):
      got = dict(np.load(tmp_path / f"{method}-{i}.npz"))
      losses = json.loads((tmp_path / f"{method}-{i}.json").read_text())
      assert_iterative_agreement(got, ref_kernels, losses, ref_losses, f"{method} process {i}")


def _written_once(out: pathlib.Path, report: str) -> None:
  """``out`` holds exactly one checkpoint with its report, written by process 0 (no second save, no lock)."""
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["config.json", "generation_config.json", "model.safetensors", report, "proxjax.json", "tokenizer.json",
       "tokenizer_config.json"])
  assert not [p.name for p in out.parent.iterdir() if p.name.startswith(out.name) and p.name != out.name]


def _assert_trained_close(got: np.ndarray, want: np.ndarray, name: str, bound: float) -> None:
  """Trained parameters across processes against one process: >= 99.9 % of the entries within rtol 1e-4 / atol 1e-6
  (tests/mesh/test_proxsparse.py's tolerance) and every entry within ``bound``. Not all within the first: the
  gradients are reduced in another order, and a first Adam step ``lr · g / (|g| + 1e-8)`` of a gradient near 1e-8 (or
  the prox's Newton solve) turns that rounding into a visible difference for the odd weight (measured: 1 entry of
  4096 in one kernel, off by 4e-6 to 8e-6)."""
  np.testing.assert_allclose(got, want, rtol=0, atol=bound, err_msg=name)
  close = np.isclose(got, want, rtol=1e-4, atol=1e-6)
  assert close.mean() >= 0.999, (name, int((~close).sum()))


@pytest.fixture(scope="module")
def training(checkpoint, corpus, tmp_path_factory) -> dict[str, object]:
  """The training commands across a pair of processes (tests/support/multihost_run.py's ``train``) and on one
  process (this one, meanwhile), on the magnitude-pruned checkpoint (finetune) and the dense one (ProxSparse,
  ProSparse)."""
  work, reference = tmp_path_factory.mktemp("multihost-train"), tmp_path_factory.mktemp("reference-train")
  ckpt, text = str(checkpoint), str(corpus)
  assert prune_cli(checkpoint, corpus, reference / "magnitude", "--method", "magnitude") == 0
  (port,) = _free_ports(1)
  procs = [Process(f"train{i}", ["train", str(i), str(port), str(work), ckpt, text, str(reference / "magnitude")],
                   work / f"train{i}.log") for i in (0, 1)]
  assert cli.main(["finetune", str(reference / "magnitude"), str(reference / "finetune"),
                   *(a.format(corpus=text) for a in FINETUNE)]) == 0
  proxsparse = proxsparse_run(ckpt, text)  # the Python API on one device, then the command line (the same steps)
  assert cli.main(["proxsparse", ckpt, str(reference / "proxsparse"), *proxsparse_args(text)]) == 0
  assert cli.main(["prosparse", ckpt, str(reference / "prosparse"), *(a.format(corpus=text) for a in PROSPARSE)]) == 0
  _wait(procs)
  for p in procs:
    _ok(p)
  print("CPU seconds:", {p.name: p.cpu_s and round(p.cpu_s, 1) for p in procs})
  return {"work": work, "reference": reference, "proxsparse": proxsparse, "procs": procs}


@pytest.mark.slow
def test_finetune_across_two_processes_equals_one_process(training):
  """``proxjax finetune`` (one step, 4 windows: one per device of the 2 x 2 mesh) across the processes: the same loss
  (1e-5) and the same trained parameters (:func:`_assert_trained_close`) as one process, the mask kept, written
  once."""
  out, ref = training["work"] / "finetune", training["reference"] / "finetune"
  _written_once(out, "proxjax-finetune.json")
  report, want = (json.loads((d / "proxjax-finetune.json").read_text()) for d in (out, ref))
  assert (report["processes"], report["mesh"]) == (2, {"data": 1, "model": 4}) and len(report["losses"]) == 1
  np.testing.assert_allclose(report["losses"], want["losses"], rtol=1e-5)
  many, one = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  assert many.keys() == one.keys()
  before, moved = load_file(str(training["reference"] / "magnitude" / "model.safetensors")), 0
  for name, value in one.items():
    _assert_trained_close(many[name], value, name, bound=1e-4)  # a tenth of the learning rate
    np.testing.assert_array_equal(many[name] == 0, value == 0, err_msg=name)  # the mask held in both
    moved += not np.array_equal(value, before[name])
  assert moved == len(one)  # the step trained every tensor (the comparison is not of untouched weights)


@pytest.mark.slow
def test_proxsparse_across_two_processes_equals_one_process(training):
  """ProxSparse (two steps: the warm-up's prox-only step, then one at the full learning rate) across the processes:
  the Python API's per-step losses, regularizer, λ₂ term and gradient norm within 1e-5 and its learned parameters
  as :func:`_assert_trained_close` says; ``proxjax proxsparse`` with
  the same settings gives the single-process losses and masks (>= 99.9 % of every kernel's, kept weights the
  originals), its checkpoint written once and 2:4."""
  ref, work = training["proxsparse"], training["work"]
  want = by_path(ref.learned)
  for i in (0, 1):
    history = json.loads((work / f"api-proxsparse-{i}.json").read_text())
    for key in HISTORY:
      np.testing.assert_allclose(history[key], getattr(ref, key), rtol=1e-5, err_msg=f"{key} process {i}")
    learned = dict(np.load(work / f"api-proxsparse-{i}.npz"))
    assert learned.keys() == want.keys()
    for name, value in want.items():
      _assert_trained_close(learned[name], np.asarray(value), name, bound=1e-5)
  assert ref.learning_rates[0] == 0 < ref.learning_rates[1]
  out, one = work / "proxsparse", training["reference"] / "proxsparse"
  _written_once(out, "proxjax-report.json")
  report, expected = (json.loads((d / "proxjax-report.json").read_text()) for d in (out, one))
  assert report["processes"] == 2 and report["sparsity"]["all_2_4"]
  np.testing.assert_allclose(report["losses"], expected["losses"], rtol=1e-5)
  np.testing.assert_allclose(report["losses"], ref.losses, rtol=1e-5)  # the command line took the API's steps
  many, single = load_file(str(out / "model.safetensors")), load_file(str(one / "model.safetensors"))
  for name, value in single.items():
    assert np.mean((many[name] != 0) == (value != 0)) >= 0.999, name
    both = (many[name] != 0) & (value != 0)
    np.testing.assert_array_equal(many[name][both], value[both], err_msg=name)


@pytest.mark.slow
def test_prosparse_across_two_processes_equals_one_process(training):
  """``proxjax prosparse`` (two steps, perplexity and activation sparsity before and after on 8 windows) across the
  processes: the single-process losses (1e-5), perplexities (1e-5), activation sparsity and trained parameters
  (:func:`_assert_trained_close`), written once; process 0 wrote the before-training evaluation's cache
  (``eval-before.json``) in the state directory, and a second run given a cache with a marked perplexity reports that
  value on every process (and the same perplexity after training)."""
  out, ref = training["work"] / "prosparse", training["reference"] / "prosparse"
  _written_once(out, "proxjax-prosparse.json")
  report, want = (json.loads((d / "proxjax-prosparse.json").read_text()) for d in (out, ref))
  assert report["processes"] == 2 and report["mesh"] == {"data": 1, "model": 4}
  for key in ("losses", "lm_losses", "l1"):
    np.testing.assert_allclose(report["training"][key], want["training"][key], rtol=1e-5, err_msg=key)
  for stage in ("before", "after"):
    np.testing.assert_allclose(report[stage]["ppl"], want[stage]["ppl"], rtol=1e-5)
    np.testing.assert_allclose(report[stage]["sparsity"], want[stage]["sparsity"], atol=1e-3)
  many, one = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  assert many.keys() == one.keys()
  for name, value in one.items():
    _assert_trained_close(many[name], value, name, bound=1e-4)
  # the before-training evaluation cached in the state directory (kept: --keep-state), written by process 0 alone
  kept = training["work"] / "kept-prosparse-state"
  assert "eval-before.json" in (names := sorted(p.name for p in kept.iterdir())), names
  assert not [n for n in names if ".tmp-" in n], names  # no temporary file left (files.atomic_write)
  saved = json.loads((kept / "eval-before.json").read_text())
  assert saved["before"] == report["before"] and saved["model"] == report["source_model"]
  assert saved["protocol"] == report["eval"]["protocol"]
  # run again with that cache (its perplexity marked): every process takes the cached value, none recomputes it
  cached = json.loads((training["work"] / "cached-prosparse" / "proxjax-prosparse.json").read_text())
  assert cached["before"] == {**report["before"], "ppl": CACHED_PPL}
  np.testing.assert_allclose(cached["after"]["ppl"], report["after"]["ppl"], rtol=1e-5)  # the same training
  for p in training["procs"]:
    assert f"perplexity {CACHED_PPL:.3f} -> " in p.output, p.output[-3000:]


@pytest.fixture(scope="module")
def resumed(checkpoint, corpus, tmp_path_factory) -> dict[str, object]:
  """``proxjax prune`` (Wanda) and ``proxjax proxsparse`` (two steps, saved after each) across a pair of processes
  each, stopped right after their first resume-state save (tests/support/multihost_run.py's ``stop``: both processes
  exit at once, as a killed job), then the same commands run again; on one process (this one, meanwhile) the same
  commands uninterrupted."""
  work, reference = tmp_path_factory.mktemp("multihost-resume"), tmp_path_factory.mktemp("reference-resume")
  ckpt, text = str(checkpoint), str(corpus)
  commands = {"wanda": ["prune", ckpt, str(work / "wanda"), "--method", "wanda", "--calibration", f"{text}/calib.txt",
                        "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--quiet"],
              "proxsparse": ["proxsparse", ckpt, str(work / "proxsparse"), *proxsparse_args(text), "--save-every", "1"]}
  ports = dict(zip(commands, _free_ports(len(commands))))
  stopped = [Process(f"stop-{n}{i}", ["stop", "1", *c, *distributed_flags(i, ports[n])], work / f"stop-{n}{i}.log")
             for n, c in commands.items() for i in (0, 1)]
  assert prune_cli(checkpoint, corpus, reference / "wanda", "--method", "wanda") == 0
  assert cli.main(["proxsparse", ckpt, str(reference / "proxsparse"), *proxsparse_args(text)]) == 0
  _wait(stopped)
  states = {n: sorted(p.name for p in (work / f"{n}.proxjax-state").iterdir()) for n in commands}
  saved = json.loads((work / "proxsparse.proxjax-state" / "train-state.json").read_text())
  ports = dict(zip(commands, _free_ports(len(commands))))
  again = [Process(f"again-{n}{i}", ["cli", *c, *distributed_flags(i, ports[n])], work / f"again-{n}{i}.log")
           for n, c in commands.items() for i in (0, 1)]
  _wait(again)
  return {"work": work, "reference": reference, "stopped": stopped, "again": again, "states": states,
          "saved_step": saved["step"], "saved_losses": saved["history"]["losses"]}


@pytest.mark.slow
def test_a_stopped_prune_resumes_across_processes(resumed):
  """Stopped after block 0: process 0 had written its kernels (gathered from both processes) and report; run again,
  every process resumes from block 1, and the checkpoint equals one process's uninterrupted run bitwise (Wanda, as
  :func:`test_prune_across_two_processes_equals_one_process`); the state is then removed."""
  for p in resumed["stopped"][:2]:
    _check_ended(p)
    assert p.returncode == STOPPED and "stopped after save 1" in p.output, p.output[-3000:]
  assert resumed["states"]["wanda"] == ["block_0000.json", "block_0000.safetensors", "run.json"]
  for p in resumed["again"][:2]:
    _ok(p)
    assert "resuming from" in p.output
  out, ref = resumed["work"] / "wanda", resumed["reference"] / "wanda"
  report = json.loads((out / "proxjax-report.json").read_text())
  assert report["resumed_blocks"] == [0] and report["processes"] == 2 and len(report["layers"]) == 14
  many, one = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  assert many.keys() == one.keys()
  for name, value in one.items():
    np.testing.assert_array_equal(many[name], value, err_msg=name)
  assert not (resumed["work"] / "wanda.proxjax-state").exists()
  assert not (resumed["work"] / "wanda.proxjax-lock").exists()  # the stopped run's lock was taken over and removed


@pytest.mark.slow
def test_a_stopped_training_resumes_across_processes(resumed):
  """ProxSparse stopped after step 1's save (the orbax checkpoint written by both processes, the state file by
  process 0); run again, every process continues from step 1 with the saved state and history, and the result is
  one process's uninterrupted run by :func:`test_proxsparse_across_two_processes_equals_one_process`'s criteria
  (losses within 1e-5, >= 99.9 % of every mask, the kept weights the originals)."""
  for p in resumed["stopped"][2:]:
    _check_ended(p)
    assert p.returncode == STOPPED and "stopped after save 1" in p.output, p.output[-3000:]
  assert resumed["states"]["proxsparse"] == ["step_0000001", "train-state.json"] and resumed["saved_step"] == 1
  for p in resumed["again"][2:]:
    _ok(p)
    assert "resuming from" in p.output
  out, ref = resumed["work"] / "proxsparse", resumed["reference"] / "proxsparse"
  _written_once(out, "proxjax-report.json")
  report, want = (json.loads((d / "proxjax-report.json").read_text()) for d in (out, ref))
  assert report["resumed_from"] == 1 and report["processes"] == 2 and report["sparsity"]["all_2_4"]
  assert report["losses"][:1] == resumed["saved_losses"]  # step 0 from the saved history
  np.testing.assert_allclose(report["losses"], want["losses"], rtol=1e-5)
  many, single = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
  for name, value in single.items():
    assert np.mean((many[name] != 0) == (value != 0)) >= 0.999, name
    both = (many[name] != 0) & (value != 0)
    np.testing.assert_array_equal(many[name][both], value[both], err_msg=name)
  assert not (resumed["work"] / "proxsparse.proxjax-state").exists()


@pytest.mark.slow
def test_eval_tasks_across_two_processes_equals_one_process(checkpoint, tmp_path, capsys):
  """``proxjax eval --tasks`` (lm-eval through the proxjax backend) across the pair: every process runs lm-eval with
  the same requests, every batch split over the 4 devices of both: a multiple-choice task's accuracy and its standard
  error, ``lee_last_word``'s accuracy and perplexity (1e-5; its bootstrapped standard error 1e-4) and a generation
  task's exact match equal one process's; process 0 alone prints the table and writes ``--json``. The backend in the
  same processes (batches of 4 rounded to the 4 devices): every process decodes the single-process generations and
  computes its log-likelihoods within 1e-4 (is-greedy equal), both processes the same numbers exactly."""
  pytest.importorskip("lm_eval")
  from tests.support.lm_eval_tasks import write_generate_task, write_mc_task

  words = ["rain", "sun", "court", "police", "cricket", "minister", "river", "fire", "market", "school"]
  write_mc_task(tmp_path, "proxjax_mc", [{"question": f"The {w} was", "choices": [" here", f" a {w}"], "label": i % 2}
                                         for i, w in enumerate(words)])
  write_generate_task(tmp_path, "proxjax_gen", [{"question": f"The {w} was", "answer": " a"} for w in words])
  work = tmp_path / "work"
  work.mkdir()
  (port,) = _free_ports(1)
  procs = [Process(f"tasks{i}", ["tasks", str(i), str(port), str(work), str(checkpoint), str(tmp_path)],
                   tmp_path / f"tasks{i}.log") for i in (0, 1)]
  one = tmp_path / "one.json"  # the single-process references, meanwhile
  assert cli.main(["eval", str(checkpoint), *TASKS, "--include-path", str(tmp_path), "--json", str(one)]) == 0
  table = capsys.readouterr().out
  reference = harness_requests(str(checkpoint))
  _wait(procs)
  for p in procs:
    _ok(p)
  many, want = json.loads((work / "tasks.json").read_text()), json.loads(one.read_text())
  assert many["processes"] == 2 and "processes" not in want
  assert many["n-samples"] == want["n-samples"] and set(many["results"]) == {"proxjax_mc", "lee_last_word",
                                                                             "proxjax_gen"}
  for task, results in want["results"].items():
    for metric, value in results.items():
      if isinstance(value, str):
        assert many["results"][task][metric] == value, (task, metric)
      else:
        rtol = 1e-4 if metric == "perplexity_stderr,none" else 1e-5
        np.testing.assert_allclose(many["results"][task][metric], value, rtol=rtol, err_msg=f"{task} {metric}")
  header = re.compile(r"^\|\s*Tasks\s*\|", re.M)
  assert len(header.findall(table)) == 1
  assert len(header.findall(procs[0].output)) == 1 and not header.findall(procs[1].output)  # printed once
  assert sorted(p.name for p in work.iterdir()) == ["harness-0.json", "harness-1.json", "tasks.json"]  # written once
  computed = [json.loads((work / f"harness-{i}.json").read_text()) for i in (0, 1)]
  assert computed[0] == computed[1]  # bitwise: every process read the same replicated scores
  assert computed[0]["generate"] == reference["generate"] and computed[0]["batch_size"] == 4
  np.testing.assert_allclose(computed[0]["rolling"], reference["rolling"], rtol=0, atol=1e-4)
  assert [g for _, g in computed[0]["tokens"]] == [g for _, g in reference["tokens"]]
  np.testing.assert_allclose([ll for ll, _ in computed[0]["tokens"]], [ll for ll, _ in reference["tokens"]], rtol=0,
                             atol=1e-4)
