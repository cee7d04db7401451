"""The workflows from Python write what the command line writes: the same checkpoint (bit for bit), the same report
and the same provenance (up to wall times); their typed jobs refuse bad settings when built."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.numpy import load_file

from proxjax import cli
from proxjax.pruning.methods import PruneConfig
from proxjax.workflows.config import CalibrationConfig, EvalConfig, EvalJob, FinetuneJob, OutputConfig, PruneJob
from proxjax.workflows.evaluate import evaluate
from proxjax.workflows.finetune import finetune
from proxjax.workflows.prune import prune

_TIMES = {"seconds"}


def _json(path):
  with open(path) as f:
    return json.load(f)


def _without_times(obj):
  if isinstance(obj, dict):
    return {k: _without_times(v) for k, v in obj.items() if k not in _TIMES}
  if isinstance(obj, list):
    return [_without_times(v) for v in obj]
  return obj


def _same_outputs(a, b, names):
  for name in names:
    if name.endswith(".safetensors"):
      x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
      assert x.keys() == y.keys()
      for k in x:
        assert x[k].tobytes() == y[k].tobytes(), (name, k)
    elif name.endswith(".json"):
      ja, jb = _json(os.path.join(a, name)), _json(os.path.join(b, name))
      ja.pop("source_model", None), jb.pop("source_model", None)
      assert _without_times(ja) == _without_times(jb), name


def test_prune_and_finetune_from_python_equal_the_cli(checkpoint, corpus, tmp_path):
  cal = str(corpus / "calib.txt")
  ev = str(corpus / "eval.txt")
  by_cli, by_py = tmp_path / "cli", tmp_path / "py"
  assert cli.main(["prune", str(checkpoint), str(by_cli), "--method", "sparsegpt", "--refine", "cg", "--calibration",
                   cal, "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--eval", ev, "--eval-seqlen", "32",
                   "--quiet"]) == 0
  report = prune(PruneJob(str(checkpoint), str(by_py), PruneConfig.from_options("sparsegpt", refine="cg"),
                          calibration=CalibrationConfig(cal, nsamples=6, seqlen=32), batch_size=4,
                          eval=EvalConfig(ev, seqlen=32, batch_size=4), progress=False))
  assert report["method"] == "sparsegpt" and report["refine"] == "cg" and report["summary"]["linears"] == 14
  _same_outputs(by_cli, by_py, ["model.safetensors", "proxjax.json", "proxjax-report.json", "config.json"])
  assert sorted(os.listdir(by_cli)) == sorted(os.listdir(by_py))

  out, text = evaluate(EvalJob(str(by_py), EvalConfig(ev, seqlen=32), json=str(tmp_path / "ppl.json"),
                               progress=False))
  assert out["ppl"] == pytest.approx(report["eval"]["ppl"], rel=1e-6) and "sparsegpt" in text
  assert _json(tmp_path / "ppl.json")["windows"] == out["windows"]

  ft_cli, ft_py = tmp_path / "ft-cli", tmp_path / "ft-py"
  assert cli.main(["finetune", str(by_cli), str(ft_cli), "--train", cal, "--steps", "3", "--batch-size", "2",
                   "--seqlen", "32", "--lr", "1e-3", "--quiet"]) == 0
  finetune(FinetuneJob(str(by_py), str(ft_py), train=cal, steps=3, batch_size=2, seqlen=32, learning_rate=1e-3,
                       progress=False))
  _same_outputs(ft_cli, ft_py, ["model.safetensors", "proxjax-finetune.json"])


@pytest.mark.parametrize("build, needle", [
    (lambda: CalibrationConfig(nsamples=0), "nsamples"),
    (lambda: CalibrationConfig(mode="shuffled"), "mode"),
    (lambda: EvalConfig("lee", max_windows=0), "max_windows"),
    (lambda: OutputConfig(""), "output directory"),
    (lambda: PruneJob("m", "o", "wanda"), "PruneConfig"),
    (lambda: PruneJob("m", "o", batch_size=0), "batch_size"),
    (lambda: PruneJob("m", "o", include="*.mlp.*"), "include"),
    (lambda: FinetuneJob("m", "o", steps=0), "steps"),
    (lambda: FinetuneJob("m", "o", learning_rate=float("nan")), "learning rate"),
])
def test_jobs_refuse_bad_settings_when_built(build, needle):
  with pytest.raises(ValueError, match=needle):
    build()


def test_workflow_configs_import_no_jax():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, proxjax.workflows.config, proxjax.pruning.methods\n"
          "print('JAX' if 'jax' in sys.modules else 'NO-JAX')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.stdout.strip() == "NO-JAX", proc.stderr
