"""``proxjax eval MODEL --tasks ...`` (lm-eval through the proxjax backend) on the session's tiny checkpoint: the table
and the results JSON of a local jsonl task, and each bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from proxjax import cli  # noqa: E402
from tests.support.lm_eval_tasks import write_mc_task  # noqa: E402


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """A folder with one lm-eval task (``proxjax_cli_mc``: 10 two-way multiple-choice questions from a jsonl file)."""
  root = tmp_path_factory.mktemp("tasks")
  words = ["rain", "sun", "court", "police", "cricket", "minister", "river", "fire", "market", "school"]
  docs = [{"question": f"The {w} was", "choices": [" here", f" a {w}"], "label": i % 2} for i, w in enumerate(words)]
  write_mc_task(root, "proxjax_cli_mc", docs)
  return root


def test_tasks_table_and_json(checkpoint, task_dir, tmp_path, capsys):
  out = tmp_path / "res" / "acc.json"
  # the shipped task (lee_last_word) is found by name next to the --include-path folder's
  code = cli.main(["eval", str(checkpoint), "--tasks", "proxjax_cli_mc,lee_last_word", "--include-path", str(task_dir),
                   "--limit", "8", "--batch-size", "4", "--json", str(out)])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "proxjax_cli_mc" in captured.out and "acc" in captured.out and "|" in captured.out
  res = json.loads(out.read_text())
  acc = res["results"]["proxjax_cli_mc"]["acc,none"]
  assert 0.0 <= acc <= 1.0 and res["n-samples"]["proxjax_cli_mc"]["effective"] == 8
  # the table's row for the task shows the JSON's accuracy (pytablewriter aligns a column's decimals, so compare numbers)
  row = next(line for line in captured.out.splitlines() if line.replace(" ", "").startswith("|proxjax_cli_mc|"))
  assert float(row.split("|")[7]) == pytest.approx(acc, abs=5e-4)
  lee = res["results"]["lee_last_word"]
  assert res["n-samples"]["lee_last_word"]["effective"] == 8 and 0.0 <= lee["acc,none"] <= 1.0
  assert lee["perplexity,none"] > 1.0
  assert res["model"] == str(checkpoint.resolve()) and res["compiles"] >= 1
  assert not list(out.parent.glob("*.tmp*"))  # written atomically


def test_the_shipped_task_needs_no_include_path():
  from proxjax.pipeline import harness  # noqa: PLC0415

  manager = harness.check_tasks(["lee_last_word"])
  assert "lee_last_word" in manager.all_tasks


def _error(capsys, *argv) -> str:
  code = cli.main(["eval", *argv])
  err = capsys.readouterr().err
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1, err
  return err


def test_bad_inputs_one_line_exit_2(checkpoint, task_dir, tmp_path, capsys):
  base = [str(checkpoint), "--tasks", "proxjax_cli_mc", "--include-path", str(task_dir)]
  assert "--limit must be at least 1" in _error(capsys, *base, "--limit", "0")
  assert "no such directory" in _error(capsys, str(checkpoint), "--tasks", "proxjax_cli_mc", "--include-path",
                                       str(tmp_path / "missing"))
  (tmp_path / "not-a-model").mkdir()
  assert "not a Hugging Face checkpoint" in _error(capsys, str(tmp_path / "not-a-model"), *base[1:])
  assert "give --dataset and --seqlen" in _error(capsys, str(checkpoint))
  assert "goes with --tasks" in _error(capsys, str(checkpoint), "--dataset", "lee", "--seqlen", "32", "--limit", "3")


def test_unknown_task_lists_close_names(checkpoint, task_dir, capsys, monkeypatch):
  """A name lm-eval does not know: the closest known names in the message. (lm-eval's full index of ~15,000 task
  names takes half a minute to build here, so this replaces it by a small one; the slow test below uses the real
  one.)"""
  import lm_eval.tasks  # noqa: PLC0415

  real = lm_eval.tasks.TaskManager

  class SmallIndex(real):
    def __init__(self, include_path=None, include_defaults=True, **kwargs):
      super().__init__(include_path=include_path, include_defaults=False, **kwargs)
      if include_defaults:
        self._all_tasks = sorted(self._all_tasks + ["arc_easy", "arc_challenge", "hellaswag"])

  monkeypatch.setattr(lm_eval.tasks, "TaskManager", SmallIndex)
  err = _error(capsys, str(checkpoint), "--tasks", "arc_eazy", "--include-path", str(task_dir))
  assert "lm-eval knows no task 'arc_eazy'" in err and "arc_easy" in err


@pytest.mark.slow
def test_unknown_and_unreachable_standard_tasks(checkpoint, capsys):
  """With lm-eval's real task index: a misspelt task lists close names; on this machine (no internet) arc_easy's
  dataset cannot be fetched: one line naming allenai/ai2_arc and how to use local copies."""
  err = _error(capsys, str(checkpoint), "--tasks", "arc_eazy")
  assert "arc_easy" in err
  err = _error(capsys, str(checkpoint), "--tasks", "arc_easy", "--limit", "2")
  assert "allenai/ai2_arc" in err and "--include-path" in err and "HF_DATASETS_OFFLINE" in err
