"""Reliability: the source checkpoint is never written, the library refuses what it cannot answer, zeros are +0.0.

Each case asserts the message (and for the data-loss cases the bytes on disk before and after)."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import proxjax
from proxjax import cli
from proxjax.models import check_sparsity, load_pretrained, save_pretrained
from proxjax.models.hf import CheckpointError
from proxjax.workflows import paths


def _digest(directory) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# --------------------------------------------------------------------------------------------- the source is sacred --


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_no_command_writes_into_over_or_around_its_source(checkpoint, tmp_path, capsys, where):
  before = _digest(checkpoint)
  out = {"same": checkpoint, "inside": checkpoint / "sub", "around": checkpoint.parent}[where]
  for argv in (["prune", str(checkpoint), str(out), "--overwrite"],
               ["finetune", str(checkpoint), str(out), "--overwrite"],
               ["proxsparse", str(checkpoint), str(out), "--lam1", "0.1", "--overwrite"],
               ["prosparse", str(checkpoint), str(out), "--overwrite"]):
    capsys.readouterr()
    assert cli.main(argv + ["--quiet"]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input checkpoint" in err and "OUT_DIR" in err, err
  assert _digest(checkpoint) == before and not (checkpoint / "sub").exists()


def test_save_pretrained_refuses_its_source(checkpoint, tmp_path):
  model = load_pretrained(checkpoint)
  before = _digest(checkpoint)
  with pytest.raises(CheckpointError, match="source checkpoint"):
    save_pretrained(model, checkpoint, source_dir=checkpoint, overwrite=True)
  assert _digest(checkpoint) == before


def test_output_paths_are_checked_before_anything_is_loaded(checkpoint, tmp_path, capsys):
  afile = tmp_path / "a-file"
  afile.write_text("x")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("keep me")
  cases = [
      (["prune", str(checkpoint), str(afile / "out")], "is a file"),
      (["prune", str(checkpoint), str(afile)], "is a file"),
      (["prune", str(checkpoint), str(tmp_path / "o1"), "--state-dir", str(afile)], "--state-dir"),
      (["prune", str(checkpoint), str(tmp_path / "o2"), "--report", str(tmp_path)], "--report"),
      (["prune", str(checkpoint), str(tmp_path / "o3"), "--report", str(checkpoint / "r.json")], "input checkpoint"),
      (["prune", str(checkpoint), str(foreign), "--overwrite"], "not a proxjax output"),
      (["eval", str(checkpoint), "--dataset", "lee", "--seqlen", "32", "--json", str(afile / "x.json")], "--json"),
  ]
  for argv, needle in cases:
    capsys.readouterr()
    assert cli.main(argv + ["--quiet"]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, (argv, err)
  assert (foreign / "keep.txt").read_text() == "keep me" and afile.read_text() == "x"


def test_an_unwritable_place_is_one_line_before_anything_is_loaded(checkpoint, tmp_path, capsys, monkeypatch):
  """A read-only directory: for real where this runs as an ordinary user, else (root writes everywhere) by making
  ``os.access`` answer what it answers an ordinary user there."""
  ro = tmp_path / "read-only"
  ro.mkdir()
  ro.chmod(0o555)
  if os.geteuid() == 0:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real_access(p, mode, **kw))
  for argv in (["prune", str(checkpoint), str(ro / "out")],
               ["prune", str(checkpoint), str(tmp_path / "o"), "--report", str(ro / "r.json")],
               ["finetune", str(checkpoint), str(tmp_path / "o"), "--state-dir", str(ro / "state")],
               ["convert-gguf", str(checkpoint / "config.json"), str(ro / "conv")]):
    capsys.readouterr()
    assert cli.main(argv + ["--quiet"] * (argv[0] != "convert-gguf")) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{ro} is not writable" in err, (argv, err)
  assert os.listdir(ro) == []


def test_a_dry_run_writes_nothing_and_says_what_the_run_would_refuse(checkpoint, tmp_path, capsys):
  out = tmp_path / "busy"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  capsys.readouterr()
  assert cli.main(["prune", str(checkpoint), str(out), "--dry-run", "--nsamples", "4", "--seqlen", "32"]) == 0
  text = capsys.readouterr().out
  assert "dry run:" in text and "note: the run itself would refuse" in text and "not empty" in text
  assert os.listdir(out) == ["notes.txt"] and not (tmp_path / "busy.proxjax-lock").exists()


def test_overwrite_replaces_a_previous_output(tmp_path):
  prev = tmp_path / "prev"
  prev.mkdir()
  (prev / "proxjax.json").write_text("{}")
  assert paths.check_output(str(prev), overwrite=True) == str(prev)
  with pytest.raises(ValueError, match="not empty"):
    paths.check_output(str(prev), overwrite=False)


# ------------------------------------------------------------------------------- the library refuses bad input ----


def test_prox_refuses_a_non_finite_strength_and_a_mismatched_tree():
  x = jnp.arange(8.0)
  for lam, eta in ((jnp.nan, 1.0), (jnp.inf, 1.0), (1.0, jnp.nan)):
    with pytest.raises(ValueError, match="finite"):
      proxjax.prox_24(x, lam, eta)
  traced = jax.jit(lambda lam: proxjax.prox_24(x, lam))(jnp.nan)  # traced: the NaN shows in the result
  assert bool(jnp.all(jnp.isnan(traced)))
  with pytest.raises(ValueError, match="structure"):
    proxjax.prox_24({"a": x}, {"a": 1.0, "b": 2.0})


def test_prox_update_never_switches_itself_off_silently():
  params = {"kernel": jnp.ones((4, 2))}
  with pytest.raises(ValueError, match="finite"):
    proxjax.prox_24_update(float("nan"), 1.0)
  tx = optax.chain(optax.sgd(0.1), proxjax.prox_24_update(lambda count: jnp.nan, 1.0))
  step = jax.jit(lambda u, s, p: tx.update(u, s, p)[0])
  updates = step({"kernel": jnp.zeros((4, 2))}, tx.init(params), params)
  assert bool(jnp.all(jnp.isnan(updates["kernel"])))


@pytest.mark.parametrize("method", ["prox", "wanda", "sparsegpt", "magnitude"])
def test_every_method_refuses_a_hessian_with_negative_curvature(method):
  k = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  with pytest.raises(ValueError, match="not a second-moment matrix"):
    proxjax.prune_kernel(k, -np.eye(8, dtype=np.float32), method)
  indefinite = np.eye(8, dtype=np.float32)
  indefinite[0, 1] = indefinite[1, 0] = 2.0  # positive diagonal, eigenvalue -1
  if method == "prox":  # the prox computes the spectrum anyway; Wanda and magnitude read only the diagonal
    with pytest.raises(ValueError, match="not positive semi-definite"):
      proxjax.prune_kernel(k, indefinite, method)
  with pytest.raises(ValueError, match="not positive semi-definite"):
    proxjax.prune_kernel(k, indefinite, method, refine="gd")


# --------------------------------------------------------------------------------------------- zeros are +0.0 ------


def test_checkpoints_store_zeros_as_positive_zero_and_check_reports_negative_ones(checkpoint, tmp_path):
  model = load_pretrained(checkpoint)
  kernel = model.model.layers[0].mlp.up_proj.kernel
  kernel[...] = -jnp.abs(kernel[...]) * (jnp.arange(kernel.shape[0])[:, None] % 4 < 2)  # half -0.0, 2:4
  assert bool(jnp.any(jnp.signbit(kernel[...]) & (kernel[...] == 0)))
  out = tmp_path / "out"
  save_pretrained(model, out, source_dir=checkpoint)
  w = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
  assert np.count_nonzero(w == 0) == w.size // 2 and not np.any(np.signbit(w) & (w == 0))
  rows = {r["name"]: r for r in check_sparsity(out)}
  assert rows["model.layers.0.mlp.up_proj.weight"]["negative_zeros"] == 0
  # a file written by another tool with -0.0 is reported
  tensors = load_file(str(out / "model.safetensors"))
  tensors["model.layers.0.mlp.up_proj.weight"] = np.where(w == 0, np.float32(-0.0), w)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  rows = {r["name"]: r for r in check_sparsity(out)}
  assert rows["model.layers.0.mlp.up_proj.weight"]["negative_zeros"] == w.size // 2


# ---------------------------------------------------------------------------------------- a full disk, a lock ------

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes beyond the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from proxjax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _prune_argv(checkpoint, corpus, out, *extra):
  return ["prune", str(checkpoint), str(out), "--method", "wanda", "--calibration", str(corpus / "calib.txt"),
          "--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--quiet", *extra]


@pytest.mark.slow  # three prunes and two subprocesses (25 s)
def test_a_full_disk_is_one_line_and_a_rerun_resumes(checkpoint, corpus, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  ref = tmp_path / "ref"
  assert cli.main(_prune_argv(checkpoint, corpus, ref, "--keep-state")) == 0
  state_sizes = [p.stat().st_size for p in (tmp_path / "ref.proxjax-state").glob("block_*.safetensors")]
  model_size = (ref / "model.safetensors").stat().st_size
  assert max(state_sizes) < model_size
  for limit, needle, kept in ((min(state_sizes) // 2, "resume state of block 0", "no block was finished"),
                              ((max(state_sizes) + model_size) // 2, "could not write the checkpoint", "kept in")):
    out = tmp_path / f"out-{limit}"
    proc = subprocess.run([sys.executable, "-c", _LIMITED.format(limit=limit), *_prune_argv(checkpoint, corpus, out)],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in err[-1] and kept in err[-1] and "rerun" in err[-1], err[-1]
    assert not out.exists()  # nothing that looks like a finished checkpoint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{limit}.tmp-")]  # no half-written save
    assert cli.main(_prune_argv(checkpoint, corpus, out)) == 0  # space freed: the rerun resumes and finishes
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_a_second_run_on_the_same_output_refuses(checkpoint, corpus, tmp_path, capsys):
  from proxjax.core import files  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  with files.run_lock(str(out) + ".proxjax-lock", str(out)):  # as if another live run held it
    capsys.readouterr()
    assert cli.main(_prune_argv(checkpoint, corpus, out)) == 2
    assert "another proxjax run" in capsys.readouterr().err
  stale = tmp_path / "out.proxjax-lock"
  stale.write_text('{"host": "%s", "pid": 999999999}' % __import__("socket").gethostname())  # its process is gone
  (tmp_path / ".out.tmp-0123456789ab").mkdir()  # a save killed mid-way
  assert cli.main(_prune_argv(checkpoint, corpus, out)) == 0
  assert not stale.exists() and not (tmp_path / ".out.tmp-0123456789ab").exists()
  with pytest.raises(CheckpointError, match="unfinished save"):
    check_sparsity(_unfinished(tmp_path))


def test_restart_deletes_nothing_while_another_run_holds_the_output(checkpoint, corpus, tmp_path, capsys):
  from proxjax.core import files  # pylint: disable=import-outside-toplevel
  out, state = tmp_path / "out", tmp_path / "out.proxjax-state"
  state.mkdir()
  (state / "block_0000.safetensors").write_bytes(b"the other run's work")
  with files.run_lock(str(out) + ".proxjax-lock", str(out)):
    capsys.readouterr()
    assert cli.main(_prune_argv(checkpoint, corpus, out, "--restart")) == 2
    assert "another proxjax run" in capsys.readouterr().err
  assert (state / "block_0000.safetensors").read_bytes() == b"the other run's work"


def test_an_interrupted_finetune_resumes_to_the_same_checkpoint(checkpoint, corpus, tmp_path, monkeypatch, capsys):
  import proxjax.workflows.finetune as wf  # pylint: disable=import-outside-toplevel
  argv = ["--train", str(corpus / "calib.txt"), "--steps", "4", "--batch-size", "2", "--seqlen", "32",
          "--lr", "1e-3", "--save-every", "2", "--quiet"]
  assert cli.main(["finetune", str(checkpoint), str(tmp_path / "ref"), *argv]) == 0
  real = wf.ft.finetune_masked

  def interrupted(*args, **kwargs):
    def stop(step, _metrics):
      if step == 2:  # the third step (0-based 2), after the save of the first two
        raise KeyboardInterrupt
    return real(*args, **kwargs, callback=stop)

  monkeypatch.setattr(wf.ft, "finetune_masked", interrupted)
  out = tmp_path / "out"
  assert cli.main(["finetune", str(checkpoint), str(out), *argv]) == 130
  assert not out.exists() and (tmp_path / "out.proxjax-state" / "train-state.json").exists()
  monkeypatch.setattr(wf.ft, "finetune_masked", real)
  capsys.readouterr()
  assert cli.main(["finetune", str(checkpoint), str(out), *argv]) == 0
  assert "resuming from" in capsys.readouterr().err
  a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)
  assert not (tmp_path / "out.proxjax-state").exists()  # removed after success


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.support.tiny_gguf import write_tiny_gguf  # pylint: disable=import-outside-toplevel
  source = tmp_path / "src"
  source.mkdir()
  write_tiny_gguf(source / "tiny.gguf")  # its converted weights (about 0.4 MB) do not fit under the 64 KiB limit
  out = tmp_path / "conv"
  proc = subprocess.run([sys.executable, "-c", _LIMITED.format(limit=1 << 16), "convert-gguf",
                         str(source / "tiny.gguf"), str(out)], capture_output=True, text=True, timeout=300)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "could not write the converted checkpoint" in err[-1] and "free space" in err[-1], err[-1]
  assert os.listdir(tmp_path) == ["src"]


def _unfinished(tmp_path):
  d = tmp_path / ".x.tmp-0123456789ab"
  d.mkdir()
  return d


# ------------------------------------------------------------------------------------------- CLI argument fuzz ----

_FLAGS = {
    "prune": [("--method", ["prox", "wanda", "sparsegpt", "magnitude", "foo"]), ("--refine", ["none", "gd", "cg", "x"]),
              ("--n", ["2", "1", "4", "-1", "two"]), ("--m", ["4", "8", "0"]), ("--lam0", ["0.01", "-1", "nan"]),
              ("--beta", ["1.01", "0.5", "inf"]), ("--cap", ["10", "0", "1.5"]), ("--budget", ["5", "0"]),
              ("--lam0-relative", ["0.1", "-0.1"]), ("--ridge", ["0", "-1"]), ("--damp", ["0.01", "-1"]),
              ("--refine-steps", ["3", "-3"]), ("--option", ["blocksize=8", "tail_fraction=0.5", "loop=scan",
                                                               "nope=1", "blocksize", "=3", "lam0=\"x\""]),
              ("--nsamples", ["4", "0", "-2"]), ("--seqlen", ["16", "0"]), ("--seed", ["1", "-1"]),
              ("--calibration", ["lee", "wiki", "nope", "/no/such.txt"]), ("--calibration-mode", ["packed", "random"]),
              ("--calibration-documents", ["3", "0"]), ("--include", ["*.mlp.*", ""]), ("--ignore", ["1.*"]),
              ("--batch-size", ["2", "0"]), ("--eval", ["lee", "nope"]), ("--eval-seqlen", ["32", "1"]),
              ("--max-windows", ["2", "0"]), ("--mesh", ["1", "data=1,model=1", "bogus"])],
    "eval": [("--dataset", ["lee", "nope"]), ("--seqlen", ["32", "1", "x"]), ("--max-windows", ["2", "0"]),
             ("--batch-size", ["2", "-1"])],
    "finetune": [("--steps", ["2", "0"]), ("--lr", ["1e-3", "nan", "-1"]), ("--seqlen", ["32", "1"]),
                 ("--batch-size", ["2", "0"]), ("--weight-decay", ["0", "-1"]), ("--train", ["lee", "zzz"]),
                 ("--eval", ["lee", "/no.txt"])],
    "proxsparse": [("--lam1", ["0.1", "-1", "nan"]), ("--steps", ["2", "0"]), ("--lr", ["1e-4", "inf"]),
                   ("--lam2", ["0", "-1"]), ("--eps", ["0.5", "0"]), ("--prox-scaling", ["lr", "zz"]),
                   ("--seqlen", ["16", "1"]), ("--batch-size", ["1", "0"]), ("--save-every", ["0", "-1"]),
                   ("--max-documents", ["3", "0"])],
    "prosparse": [("--steps", ["4", "0"]), ("--l1-stages", ["2:1e-3", "9:1e-3", "x"]), ("--threshold", ["0", "0.01"]),
                  ("--export", ["relu", "fatrelu", "nope"]), ("--lr-schedule", ["cosine", "x"]),
                  ("--l1-warmup-steps", ["1", "99"]), ("--eval", ["none", "lee"])],
}


def test_cli_fuzz_never_a_traceback(checkpoint, tmp_path, monkeypatch, capsys):
  """Random combinations of documented flags and bad values: each ends in success (the job reaches the workflow)
  or one clear error line with exit code 2 (argparse's own usage errors exit 2 too), never a traceback."""
  import random  # pylint: disable=import-outside-toplevel

  import proxjax.workflows.evaluate, proxjax.workflows.finetune, proxjax.workflows.prune  # noqa: F401,E401
  import proxjax.workflows.prosparse, proxjax.workflows.proxsparse  # noqa: F401,E401
  reached = []

  class _Any(float):  # a stand-in result: every key is another zero
    def __getitem__(self, key):
      return _Any(0.0)

  for module, name in (("prune", "prune"), ("evaluate", "evaluate"), ("finetune", "finetune"),
                       ("proxsparse", "proxsparse"), ("prosparse", "prosparse")):
    def stub(job, _n=name):
      reached.append(_n)
      return (_Any(0.0), "text") if _n == "evaluate" else _Any(0.0)
    monkeypatch.setattr(f"proxjax.workflows.{module}.{name}", stub)
  rng = random.Random(0)
  outcomes = {0: 0, 2: 0}
  for i in range(80):
    command = rng.choice(sorted(_FLAGS))
    argv = [command, str(checkpoint)] + ([] if command == "eval" else [str(tmp_path / f"out{i}")])
    if command == "eval" and rng.random() < 0.9:
      argv += ["--dataset", "lee", "--seqlen", "32"]
    if command == "proxsparse" and rng.random() < 0.9:
      argv += ["--lam1", "0.1"]
    for flag, values in rng.sample(_FLAGS[command], k=rng.randint(1, 4)):
      argv += [flag, rng.choice(values)]
    capsys.readouterr()
    try:
      code = cli.main(argv + ["--quiet"] if command != "eval" else argv)
    except SystemExit as e:  # argparse's usage errors
      code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
      assert err.strip() and "error" in err.strip().splitlines()[-1], (argv, err)
    outcomes[code] += 1
  assert outcomes[0] > 5 and outcomes[2] > 20, outcomes  # both kinds were exercised
  assert len(reached) == outcomes[0]


def test_prosparse_before_cache_is_used_when_valid_and_recomputed_when_not(tmp_path):
  """The state directory's eval-before.json is a cache: a valid one for this protocol and model is used; a missing,
  corrupt, truncated or other-protocol one gives None (the caller evaluates again), never a traceback."""
  from proxjax.workflows import prosparse as workflow  # pylint: disable=import-outside-toplevel
  cached = tmp_path / "eval-before.json"
  protocol, before = {"seqlen": 16, "windows": 2}, {"ppl": 12.5, "sparsity": 0.25}
  lookup = lambda: workflow._cached_before(str(cached), protocol, "m")  # pylint: disable=protected-access
  assert lookup() is None  # missing
  cached.write_text(json.dumps({"protocol": protocol, "model": "m", "before": before}))
  assert lookup() == before
  for text in ("{not json", json.dumps({"protocol": protocol, "model": "m", "before": before})[:-9], "[1, 2]",
               json.dumps({"protocol": {"seqlen": 32}, "model": "m", "before": before}),
               json.dumps({"protocol": protocol, "model": "other", "before": before}),
               json.dumps({"protocol": protocol, "model": "m"})):
    cached.write_text(text)
    assert lookup() is None, text
