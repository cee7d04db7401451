"""The ``proxjax`` command line end to end on a tiny random LLaMA with a real (tiny) tokenizer.

The pruned checkpoint is checked with transformers' PyTorch ``LlamaForCausalLM``: it loads, it is 2:4, and its
perplexity on the same windows equals the one ``proxjax eval`` reports.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

from proxjax import data
from proxjax import cli
from tests.support.cli import prune_cli

# The tiny ``checkpoint`` and ``corpus`` are session-scoped fixtures of tests/conftest.py, shared with the other
# files that use them.


def _torch_ppl(model_dir, windows):
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(windows.astype(np.int64))).logits.double()
  logp = torch.log_softmax(logits[:, :-1], -1)
  nll = -logp.gather(-1, torch.from_numpy(windows[:, 1:].astype(np.int64))[..., None]).mean()
  return math.exp(float(nll))


def test_prune_check_eval_and_torch_interop(checkpoint, corpus, tmp_path, capsys):
  out = tmp_path / "pruned"
  assert prune_cli(checkpoint, corpus, out, "--method", "wanda", "--refine", "cg", "--eval", str(corpus / "eval.txt"),
                "--eval-seqlen", "32") == 0
  files = sorted(os.listdir(out))
  for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "proxjax.json",
            "proxjax-report.json", "proxjax-layer-losses.png"):
    assert f in files, files
  assert not os.path.exists(str(out) + ".proxjax-state")  # resume state removed after success
  report = json.loads((out / "proxjax-report.json").read_text())
  assert report["method"] == "wanda" and report["refine"] == "cg" and len(report["layers"]) == 14
  assert report["calibration"]["tokens"] == 6 * 32 and report["calibration"]["seed"] == 0
  assert all(r["loss_after_refine"] <= r["loss_before_refine"] + 1e-6 for r in report["layers"])
  provenance = json.loads((out / "proxjax.json").read_text())
  assert provenance["method"] == "wanda" and provenance["proxjax_version"]

  capsys.readouterr()
  assert cli.main(["check", str(out)]) == 0
  assert "0 not 2:4" in capsys.readouterr().out
  assert cli.main(["check", str(checkpoint)]) == 1  # the dense model is not 2:4

  assert cli.main(["eval", str(out), "--dataset", str(corpus / "eval.txt"), "--seqlen", "32", "--json",
                   str(tmp_path / "ppl.json"), "--quiet"]) == 0
  printed = capsys.readouterr().out
  res = json.loads((tmp_path / "ppl.json").read_text())
  assert {"ppl", "tokens", "windows", "seqlen"} <= set(res) and res["seqlen"] == 32 and res["windows"] >= 10
  assert "wanda" in printed and str(res["windows"]) in printed
  assert res["ppl"] == pytest.approx(report["eval"]["ppl"], rel=1e-6)

  # transformers' PyTorch model loads the pruned checkpoint, sees 2:4 weights and gives the same perplexity.
  tok = data.load_tokenizer(out)
  windows = data.load_evaluation(tok, str(corpus / "eval.txt"), seqlen=32).windows
  assert windows.shape[0] == res["windows"]
  torch_model = transformers.LlamaForCausalLM.from_pretrained(out)
  w = torch_model.model.layers[1].mlp.down_proj.weight.detach().numpy()
  assert np.all(np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1) <= 2)
  assert _torch_ppl(out, windows) == pytest.approx(res["ppl"], rel=1e-4)


def _figures_saved(monkeypatch):
  """Records every matplotlib figure saved from now on (the figure objects, inspectable after they are closed)."""
  import matplotlib.figure  # pylint: disable=import-outside-toplevel
  saved, original = [], matplotlib.figure.Figure.savefig

  def savefig(fig, *args, **kwargs):
    saved.append(fig)
    return original(fig, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  return saved


def test_prox_prune_and_plot(checkpoint, corpus, tmp_path, monkeypatch):
  from matplotlib import colors, image  # pylint: disable=import-outside-toplevel

  out = tmp_path / "prox"
  assert prune_cli(checkpoint, corpus, out, "--method", "prox", "--budget", "20", "--ignore", "1.*") == 0
  report = json.loads((out / "proxjax-report.json").read_text())
  assert [r["block"] for r in report["layers"]] == [0] * 7 and report["config"]["options"]["budget"] == 20
  # the schedule with its defaults resolved (the options keep None where a default applies)
  assert report["schedule"] == {"lam0_relative": 1e-4, "budget": 20, "pace": 0.01}
  assert all(r["iterations"] > 0 for r in report["layers"])
  # A second report to compare with: another method, losses three times as large.
  other = dict(report, method="magnitude", refine=None,
               layers=[dict(r, loss_after_refine=3 * r["loss_after_refine"]) for r in report["layers"]])
  (tmp_path / "other.json").write_text(json.dumps(other))
  saved = _figures_saved(monkeypatch)
  assert cli.main(["plot", str(out / "proxjax-report.json"), str(tmp_path / "other.json"), "--out",
                   str(tmp_path / "cmp.png")]) == 0
  # The figure: one line per report, labelled by method (+refinement), through that report's per-layer losses.
  (fig,) = saved
  (ax,) = fig.axes
  lines = ax.get_lines()
  assert [line.get_label() for line in lines] == [f"prox+{report['refine']}", "magnitude"]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in lines]
  for line, rep in zip(lines, (report, other)):
    np.testing.assert_allclose(line.get_ydata(), [r["loss_after_refine"] for r in rep["layers"]], rtol=1e-12)
    np.testing.assert_array_equal(line.get_xdata(), np.arange(7))
  assert ax.get_yscale() == "log"
  # The PNG decodes to the figure's size (11 x 4.5 in at 120 dpi) and shows both lines' colours on a white canvas.
  png = image.imread(str(tmp_path / "cmp.png"))
  assert png.shape == (540, 1320, 4) and png.dtype == np.float32
  rgb = png[..., :3].reshape(-1, 3)
  assert np.mean(np.all(rgb == 1.0, axis=1)) > 0.5  # mostly white background
  for line in lines:
    colour = np.asarray(colors.to_rgb(line.get_color()), np.float32)
    near = np.sum(np.max(np.abs(rgb - colour), axis=1) < 0.05)
    assert near > 20, (line.get_label(), line.get_color(), near)


def test_bad_inputs_give_clear_errors_and_no_output(checkpoint, corpus, tmp_path, capsys):
  out = tmp_path / "out"
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  cases = [
      (["prune", str(empty), str(out)], "config.json"),
      (["prune", str(checkpoint), str(out), "--calibration", str(corpus / "empty.txt")], "empty"),
      (["prune", str(checkpoint), str(out), "--calibration", str(corpus / "short.txt"), "--nsamples", "4",
        "--seqlen", "32"], "tokens"),
      (["prune", str(checkpoint), str(out), "--calibration", str(tmp_path / "missing.txt")], "missing.txt"),
      (["eval", str(checkpoint), "--dataset", str(corpus / "short.txt"), "--seqlen", "512"], "512"),
  ]
  for argv, needle in cases:
    capsys.readouterr()
    assert cli.main(argv + ["--quiet"]) == 2, argv
    err = capsys.readouterr().err
    assert "error" in err and needle in err, (argv, err)
    assert not out.exists(), argv
  assert cli.main(["prune", str(tmp_path / "nope"), str(out)]) == 2
  out.mkdir()
  (out / "x").write_text("keep me")
  capsys.readouterr()
  assert prune_cli(checkpoint, corpus, out, "--method", "magnitude") == 2
  assert "not empty" in capsys.readouterr().err
  assert (out / "x").read_text() == "keep me"


def test_finetune_keeps_the_pattern_and_lowers_the_loss(checkpoint, corpus, tmp_path, capsys):
  pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
  assert prune_cli(checkpoint, corpus, pruned, "--method", "magnitude") == 0
  capsys.readouterr()
  assert cli.main(["finetune", str(pruned), str(tuned), "--train", str(corpus / "calib.txt"), "--steps", "12",
                   "--batch-size", "2", "--seqlen", "32", "--lr", "3e-3", "--eval", str(corpus / "eval.txt"),
                   "--eval-seqlen", "32", "--quiet"]) == 0
  res = json.loads((tuned / "proxjax-finetune.json").read_text())
  assert len(res["losses"]) == 12 and np.mean(res["losses"][-3:]) < np.mean(res["losses"][:3])
  assert res["ppl_after"] < res["ppl_before"]
  assert cli.main(["check", str(tuned)]) == 0
  a = transformers.LlamaForCausalLM.from_pretrained(pruned).state_dict()
  b = transformers.LlamaForCausalLM.from_pretrained(tuned).state_dict()
  w0, w1 = a["model.layers.0.mlp.up_proj.weight"].numpy(), b["model.layers.0.mlp.up_proj.weight"].numpy()
  np.testing.assert_array_equal(w1 == 0, w0 == 0)  # same zeros (a kept weight is not exactly 0 after training)
  assert not np.array_equal(w0, w1)
  assert json.loads((tuned / "proxjax.json").read_text())["method"] == "magnitude"  # provenance carried over


def test_prune_dry_run_prints_the_memory_model_and_writes_nothing(checkpoint, tmp_path, capsys):
  from proxjax.models import LlamaConfig  # pylint: disable=import-outside-toplevel
  from proxjax.pipeline import memory  # pylint: disable=import-outside-toplevel

  out = tmp_path / "never"
  before = sorted(p.name for p in tmp_path.iterdir()), sorted((p.name, p.stat().st_mtime_ns) for p in
                                                              checkpoint.iterdir())
  assert cli.main(["prune", str(checkpoint), str(out), "--dry-run", "--method", "prox", "--budget", "300",
                   "--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--device-tflops", "1",
                   "--device-bandwidth", "10"]) == 0
  text = capsys.readouterr().out
  # The printed table is the memory model's, number for number, for the same arguments (TFLOP/s and GB/s in SI;
  # the CLI keeps the model on the device unless --offload is given).
  est = memory.estimate(LlamaConfig.from_dir(checkpoint), nsamples=6, seqlen=32, method="prox", batch_size=4,
                        iterations=300, offload=False, flops_per_s=1e12, bytes_per_s=10e9)
  head, table = text.rstrip("\n").split("\n", 1)
  assert head.startswith(f"dry run: {checkpoint}, prox, calibration 6 x 32, batch 4"), head
  assert table == memory.format_estimate(est)
  assert "peak" in table and "whole model" in table and "accumulate down_proj" in table, table
  peak = next(line for line in table.splitlines() if line.split()[:1] == ["peak"])
  assert float(peak.split()[-1]) == pytest.approx(est.peak_bytes / 2 ** 30, abs=5e-4) and est.peak_bytes > 0
  assert f"{est.iterations} prox iterations" in table and est.iterations == 300
  assert est.total.seconds is not None and est.total.seconds > 0
  # Nothing is written: no output (or resume state) directory, the checkpoint untouched.
  assert not out.exists() and not os.path.exists(str(out) + ".proxjax-state")
  assert before == (sorted(p.name for p in tmp_path.iterdir()),
                    sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir()))


@pytest.mark.parametrize("extra, needles", [
    (["--method", "wanda", "--damp", "0.01"], ["--damp", "'damp'", "'wanda'"]),
    (["--method", "wanda", "--option", "lam0=0.1"], ["--option lam0", "'lam0'", "'wanda'"]),
    (["--method", "sparsegpt", "--ridge", "0.1"], ["--ridge", "'sparsegpt'"]),
    (["--method", "prox", "--option", "blocksize=64"], ["blocksize", "'prox'"]),
    (["--method", "prox", "--n", "1"], ["2:4"]),
    (["--method", "prox", "--budget", "0"], ["budget"]),
    (["--method", "prox", "--paper", "--beta", "1.1"], ["--paper", "--beta"]),
    (["--method", "prox", "--paper", "--pace", "0.01"], ["--paper", "--pace"]),
    (["--method", "prox", "--pace", "1.5"], ["--pace", "pace must be < 1"]),
    (["--method", "prox", "--lam0", "0.1", "--lam0-relative", "0.1"], ["--lam0,", "--lam0-relative", "not both"]),
    (["--method", "wanda", "--paper"], ["--paper", "'wanda'"]),
    (["--method", "wanda", "--grad-dtype", "float32"], ["--grad-dtype", "'wanda'"]),
    (["--method", "wanda", "--refine-steps", "10"], ["refine"]),
    (["--nsamples", "0"], ["nsamples"]),
])
def test_option_errors_exit_2_before_jax_is_imported(checkpoint, tmp_path, extra, needles):
  """An option that does not belong to the method (or a bad value) is refused in one line, exit code 2, before any
  model is loaded: the process never even imports JAX."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys; from proxjax import cli\n"
          "try:\n  rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n  rc = e.code\n"
          "print('jax imported' if 'jax' in sys.modules else 'no jax', rc)")
  out = tmp_path / "never"
  proc = subprocess.run([sys.executable, "-c", code, "prune", str(checkpoint), str(out), *extra],
                        capture_output=True, text=True, timeout=60)
  assert proc.stdout.split() == ["no", "jax", "2"], (proc.stdout, proc.stderr)
  err = proc.stderr.strip()
  assert len(err.splitlines()) == 1 and "error" in err, err
  assert all(n in err for n in needles), err
  assert not out.exists()


def test_grad_dtype_flag_and_the_paper_preset():
  """``--grad-dtype`` reaches the prox configuration; ``--paper`` takes the float32 gradient unless the flag says
  otherwise (the gradient's dtype is not part of the schedule it fixes)."""
  from proxjax.cli.main import build_parser, prune_config  # pylint: disable=import-outside-toplevel
  config = lambda *flags: prune_config(build_parser().parse_args(["prune", "m", "o", *flags])).method
  assert config().grad_dtype == "bfloat16" and config("--grad-dtype", "float32").grad_dtype == "float32"
  paper = config("--paper")
  assert (paper.lam0, paper.beta, paper.grad_dtype) == (0.01, 1.01, "float32")
  paper = config("--paper", "--grad-dtype", "bfloat16")
  assert (paper.lam0, paper.beta, paper.accelerate, paper.grad_dtype) == (0.01, 1.01, False, "bfloat16")


def test_help_imports_no_jax():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys; from proxjax import cli\n"
          "try:\n  cli.main(['prune', '--help'])\nexcept SystemExit:\n  pass\n"
          "print('JAX' if 'jax' in sys.modules else 'NO-JAX')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.stdout.strip().endswith("NO-JAX") and "--method" in proc.stdout, proc.stdout[-300:]
