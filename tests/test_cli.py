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
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from proxjax import data
from proxjax import cli
from test_llama import make_torch_model  # tests/ is on sys.path

VOCAB = 320


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Calibration and evaluation text files from the offline news corpus (disjoint articles)."""
  root = tmp_path_factory.mktemp("text")
  lee = data.load_documents("lee", split="all")
  (root / "calib.txt").write_text("\n\n".join(lee[:40]))
  (root / "eval.txt").write_text("\n\n".join(lee[200:215]))
  (root / "empty.txt").write_text("  \n")
  (root / "short.txt").write_text("A few words only.")
  return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
  """A tiny random Llama saved by transformers, plus a byte-level BPE tokenizer trained on the calibration text."""
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  model = make_torch_model("llama", seed=3, vocab_size=VOCAB, bos_token_id=None, eos_token_id=0)
  model.save_pretrained(path)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train([str(corpus / "calib.txt")], trainer)
  assert tok.get_vocab_size() <= VOCAB
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
  return path


def _prune(checkpoint, corpus, out, *extra):
  return cli.main(["prune", str(checkpoint), str(out), "--calibration", str(corpus / "calib.txt"), "--nsamples", "6",
                   "--seqlen", "32", "--batch-size", "4", "--quiet", *extra])


def _torch_ppl(model_dir, windows):
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(windows.astype(np.int64))).logits.double()
  logp = torch.log_softmax(logits[:, :-1], -1)
  nll = -logp.gather(-1, torch.from_numpy(windows[:, 1:].astype(np.int64))[..., None]).mean()
  return math.exp(float(nll))


def test_prune_check_eval_and_torch_interop(checkpoint, corpus, tmp_path, capsys):
  out = tmp_path / "pruned"
  assert _prune(checkpoint, corpus, out, "--method", "wanda", "--refine", "cg", "--eval", str(corpus / "eval.txt"),
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


def test_prox_prune_and_plot(checkpoint, corpus, tmp_path):
  out = tmp_path / "prox"
  assert _prune(checkpoint, corpus, out, "--method", "prox", "--budget", "20", "--ignore", "1.*") == 0
  report = json.loads((out / "proxjax-report.json").read_text())
  assert [r["block"] for r in report["layers"]] == [0] * 7 and report["config"]["options"]["budget"] == 20
  assert all(r["iterations"] > 0 for r in report["layers"])
  assert cli.main(["plot", str(out / "proxjax-report.json"), str(out / "proxjax-report.json"), "--out",
                   str(tmp_path / "cmp.png")]) == 0
  assert (tmp_path / "cmp.png").stat().st_size > 1000


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
  with pytest.raises(SystemExit):
    cli.main(["prune", str(tmp_path / "nope"), str(out)])
  out.mkdir()
  (out / "x").write_text("keep me")
  capsys.readouterr()
  assert _prune(checkpoint, corpus, out, "--method", "magnitude") == 2
  assert "not empty" in capsys.readouterr().err
  assert (out / "x").read_text() == "keep me"


def test_finetune_keeps_the_pattern_and_lowers_the_loss(checkpoint, corpus, tmp_path, capsys):
  pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
  assert _prune(checkpoint, corpus, pruned, "--method", "magnitude") == 0
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
  out = tmp_path / "never"
  assert cli.main(["prune", str(checkpoint), str(out), "--dry-run", "--nsamples", "6", "--seqlen", "32",
                   "--device-tflops", "1", "--device-bandwidth", "10"]) == 0
  text = capsys.readouterr().out
  assert "peak" in text and "whole model" in text and "accumulate down_proj" in text, text
  assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (["--method", "wanda", "--damp", "0.01"], ["--damp", "'damp'", "'wanda'"]),
    (["--method", "wanda", "--option", "lam0=0.1"], ["--option lam0", "'lam0'", "'wanda'"]),
    (["--method", "sparsegpt", "--ridge", "0.1"], ["--ridge", "'sparsegpt'"]),
    (["--method", "prox", "--option", "blocksize=64"], ["blocksize", "'prox'"]),
    (["--method", "prox", "--n", "1"], ["2:4"]),
    (["--method", "prox", "--budget", "0"], ["budget"]),
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


def test_help_imports_no_jax():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys; from proxjax import cli\n"
          "try:\n  cli.main(['prune', '--help'])\nexcept SystemExit:\n  pass\n"
          "print('JAX' if 'jax' in sys.modules else 'NO-JAX')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.stdout.strip().endswith("NO-JAX") and "--method" in proc.stdout, proc.stdout[-300:]
