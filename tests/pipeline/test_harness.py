"""Tests for proxjax.pipeline.harness, the lm-eval backend: request by request against lm-eval's own ``hf`` backend
(HFLM, PyTorch float32 on CPU) on the session's tiny checkpoint (log-likelihoods within 1e-4 absolute, is_greedy
equal, on a multiple-choice jsonl task loaded through an lm-eval task YAML, with truncated requests and an empty
context; rolling log-likelihoods; greedy generation with stop strings), the bounded number of compiled shapes, the
registration under ``proxjax`` and that importing the backend imports no torch; ``slow``: the same parity on
SmolLM2-135M."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from proxjax.pipeline import harness  # noqa: E402
from tests.support.lm_eval_tasks import write_mc_task  # noqa: E402

MAX_LENGTH = 48
"""Both backends' context length in the tiny-model tests: several requests are longer (truncated)."""

QUESTIONS = [
    ("The government said on Tuesday that", [" it would act", " the weather", " never"], 0),
    ("", [" Hello world", " The", " A new day"], 1),  # empty context: conditioned on the prefix token
    ("Police said the man", [" was arrested", " ran away"], 0),
    ("Australia's cricket team", [" won the match", " lost", " played in Sydney on Sunday"], 2),
]


def mc_task(root, long_text: str) -> str:
  """Writes a multiple-choice lm-eval task (YAML + jsonl, loaded offline with ``dataset_path: json``) under ``root``
  and returns its name. One question is longer than ``MAX_LENGTH`` tokens."""
  docs = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
  docs.append({"question": long_text, "choices": [" the", " and the minister said"], "label": 1})
  return write_mc_task(root, "proxjax_tiny_mc", docs)


@pytest.fixture(scope="module")
def backends(checkpoint):
  """``(proxjax backend, HFLM)`` on the tiny checkpoint, both float32 with ``max_length=MAX_LENGTH``."""
  hf_mod = pytest.importorskip("lm_eval.models.huggingface")
  ours = harness.ProxjaxLM(pretrained=str(checkpoint), dtype="float32", batch_size=4, max_length=MAX_LENGTH)
  ref = hf_mod.HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)
  return ours, ref


@pytest.fixture(scope="module")
def lee():
  from proxjax import data  # noqa: PLC0415
  return data.load_documents("lee", split="all")


def assert_same_loglikelihoods(a, b, tol=1e-4):
  assert len(a) == len(b)
  for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b)):
    assert abs(la - lb) <= tol, (i, la, lb)
    assert ga == gb, (i, ga, gb)


def test_tokenization_is_hflm_s(backends, lee):
  ours, ref = backends
  for s in ["Hello world", " leading space", lee[5][:300], "<eos>starts with the prefix", ""]:
    assert ours.tok_encode(s) == ref.tok_encode(s), s
    assert ours.tok_encode(s, add_special_tokens=False) == ref.tok_encode(s, add_special_tokens=False), s
  assert (ours.eot_token_id, ours.prefix_token_id) == (ref.eot_token_id, ref.prefix_token_id)
  ids = ours.tok_encode(lee[6][:200]) + [ours.eot_token_id]
  assert ours.tok_decode(ids) == ref.tok_decode(ids)


def task_requests(name: str, include_path) -> list:
  """The loglikelihood requests lm-eval builds for task ``name`` (zero-shot), as it would for any backend."""
  from lm_eval.tasks import TaskManager, get_task_dict  # noqa: PLC0415
  task = get_task_dict([name], TaskManager(include_path=str(include_path), include_defaults=False))[name]
  task.build_all_requests(rank=0, world_size=1)
  return task.instances


def test_multiple_choice_task_matches_hflm(backends, lee, tmp_path):
  """The requests of a multiple-choice jsonl task loaded through an lm-eval task YAML (one with an empty context, one
  longer than max_length): every (log-likelihood, is_greedy) as HFLM's."""
  ours, ref = backends
  name = mc_task(tmp_path, lee[10][:700])
  reqs = task_requests(name, tmp_path)
  assert len(reqs) == sum(len(c) for _, c, _ in QUESTIONS) + 2
  assert any(r.args[0] == "" for r in reqs)
  assert max(len(ours.tok_encode(r.args[0])) for r in reqs) > MAX_LENGTH + 1
  assert_same_loglikelihoods(ours.loglikelihood(reqs, disable_tqdm=True), ref.loglikelihood(reqs, disable_tqdm=True))


def greedy_tokens(model, ctx: list[int], n: int) -> list[int]:
  """``n`` argmax tokens after ``ctx`` by full forward passes of the PyTorch model (no cache, no EOS rule)."""
  import torch  # noqa: PLC0415
  ids = list(ctx)
  with torch.no_grad():
    for _ in range(n):
      ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
  return ids[len(ctx):]


def test_token_requests_truncation_and_is_greedy(backends):
  """``_loglikelihood_tokens`` on token lists: continuations the model predicts greedily (is_greedy True), the same
  with one token changed (False), requests longer than max_length + 1 (truncated from the left), one-token ones."""
  ours, ref = backends
  rng = np.random.default_rng(0)
  reqs = []
  for n_ctx, n_cont in [(5, 3), (30, 4), (60, 2), (1, 1), (47, 1), (48, 1), (100, 6), (12, 12)]:
    ctx = rng.integers(1, 320, n_ctx).tolist()
    # the context the scored window sees: (ctx + cont)[-(MAX_LENGTH + 1):][:-1]
    cont = greedy_tokens(ref.model, ctx[-(MAX_LENGTH + 1 - n_cont):], n_cont)
    reqs.append((("c", "x"), ctx, cont))
    reqs.append((None, ctx, cont[:-1] + [(cont[-1] + 1) % 320]))
  a, b = ours._loglikelihood_tokens(reqs, disable_tqdm=True), ref._loglikelihood_tokens(reqs, disable_tqdm=True)
  assert_same_loglikelihoods(a, b)
  assert [g for _, g in a[::2]] == [True] * 8 and not any(g for _, g in a[1::2])


def test_rolling_matches_hflm(backends, lee):
  ours, ref = backends
  docs = [lee[2][:900], "short text", lee[3][:200], "x"]
  reqs = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(docs)]
  a, b = ours.loglikelihood_rolling(reqs, disable_tqdm=True), ref.loglikelihood_rolling(reqs, disable_tqdm=True)
  assert len(ours.tok_encode(docs[0])) > 3 * MAX_LENGTH  # several windows
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_generate_until_matches_hflm(backends, lee, caplog):
  """Greedy generation with stop strings (cut at the first one), the default stop (EOS text), ``max_gen_toks``, and
  a prompt longer than max_length - max_gen_toks (truncated from the left, said once in the log)."""
  ours, ref = backends
  prompts = ["The government said", "Police", lee[12][:400], "Rain and", "<eos>The"]
  kwargs = [{"until": ["\n"], "max_gen_toks": 12}, {"until": [" the", "."], "max_gen_toks": 12},
            {"max_gen_toks": 10}, {"until": "e", "max_gen_toks": 12, "do_sample": False}]
  reqs = [Instance("generate_until", {}, (p, k), i) for i, (p, k) in enumerate((p, k) for k in kwargs
                                                                                 for p in prompts)]
  with caplog.at_level("WARNING", logger="proxjax.pipeline.harness"):
    a = ours.generate_until(reqs, disable_tqdm=True)
  b = ref.generate_until(reqs, disable_tqdm=True)
  assert a == b
  assert any(a) and all(not s.endswith(" the") for s in a)
  assert sum("truncated from the left" in r.message for r in caplog.records) == 1


def test_compiled_shapes_are_bounded(backends):
  """60 requests of 60 different lengths (2..100 tokens, continuations of 1-3 tokens; max_length 48, so longer ones
  are truncated): input lengths fall into the 4 buckets 16, 24, 32, 48 and continuations into one. With max_length
  48 there are only two continuation buckets per length bucket (16 and the whole row, for the rolling windows), so
  at most 8 shapes are ever compiled for this backend, the other tests on it included; results come back in request
  order."""
  ours, _ = backends
  rng = np.random.default_rng(1)
  lengths = rng.permutation(np.arange(2, 102))[:60]
  reqs = [(None, rng.integers(1, 320, n - 1).tolist(), rng.integers(1, 320, 1 + n % 3).tolist()) for n in lengths]
  out = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
  inputs = {min(len(c) + len(x) - 1, MAX_LENGTH) for _, c, x in reqs}
  assert {harness.input_bucket(n, MAX_LENGTH) for n in inputs} == {16, 24, 32, 48}
  assert {harness.continuation_bucket(len(x), MAX_LENGTH) for _, _, x in reqs} == {16}
  assert 1 <= ours.compiles <= 8
  i = int(np.argmax(lengths))
  alone = ours._loglikelihood_tokens([reqs[i]], disable_tqdm=True)[0]
  assert abs(alone[0] - out[i][0]) < 1e-5 and alone[1] == out[i][1]


def test_constructor_errors(checkpoint, tmp_path):
  from proxjax import data  # noqa: PLC0415
  with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
    harness.ProxjaxLM(pretrained=str(tmp_path))
  with pytest.raises(ValueError, match="either pretrained"):
    harness.ProxjaxLM()
  with pytest.raises(ValueError, match="batch_size"):
    harness.ProxjaxLM(pretrained=str(checkpoint), batch_size="auto")
  with pytest.raises(ValueError, match="unknown model argument"):
    harness.ProxjaxLM(pretrained=str(checkpoint), temperature=3)
  tok = data.load_tokenizer(checkpoint)
  with pytest.raises(ValueError, match="needs tokenizer"):
    harness.ProxjaxLM(model=object())
  assert tok.eos_token_id == 0


def test_registration_and_no_torch():
  """``import proxjax`` (before lm-eval) makes ``proxjax`` a registered lm-eval model without importing lm-eval;
  lm-eval's own backends stay registered; importing the backend module imports no torch."""
  code = textwrap.dedent("""\
      import sys, proxjax
      assert "lm_eval" not in sys.modules
      from lm_eval.api.registry import get_model, model_registry
      assert "hf" in model_registry and "proxjax" in model_registry
      cls = get_model("proxjax")
      import proxjax.pipeline.harness as h
      assert cls is h.ProxjaxLM
      print("torch" in sys.modules, "transformers" in sys.modules)
      """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_smollm2_parity(lee):
  """SmolLM2-135M (float32): 40 loglikelihood requests (news text, contexts of 5-400 tokens, continuations of 1-12
  tokens) and 3 rolling documents against HFLM."""
  from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

  from proxjax.models import convert  # noqa: PLC0415
  model_dir = str(convert.default_model_dir())
  ours = harness.ProxjaxLM(pretrained=model_dir, dtype="float32", batch_size=8, max_length=512)
  ref = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=8, max_length=512)
  rng = np.random.default_rng(0)
  reqs = []
  for k in range(40):
    doc = lee[20 + k]
    words = doc.split()
    cut = int(rng.integers(3, min(len(words) - 1, 300)))
    n = int(rng.integers(1, 4))
    reqs.append(Instance("loglikelihood", {}, (" ".join(words[:cut]), " " + " ".join(words[cut:cut + n])), k))
  reqs.append(Instance("loglikelihood", {}, ("", " The"), 40))
  # float32 through 30 layers: 1e-4 absolute plus 4e-6 relative (measured: 1.5e-4 at a log-likelihood of -42.7, a
  # 300-word context; is_greedy equal everywhere)
  a, b = ours.loglikelihood(reqs, disable_tqdm=True), ref.loglikelihood(reqs, disable_tqdm=True)
  for (la, ga), (lb, gb) in zip(a, b):
    assert abs(la - lb) <= 1e-4 + 4e-6 * abs(lb) and ga == gb, (la, lb, ga, gb)
  roll = [Instance("loglikelihood_rolling", {}, (lee[70 + i][:3000],), i) for i in range(3)]
  np.testing.assert_allclose(ours.loglikelihood_rolling(roll, disable_tqdm=True),
                             ref.loglikelihood_rolling(roll, disable_tqdm=True), atol=1e-4, rtol=4e-6)
