"""lm-eval tasks written by a test (multiple choice, generation): a jsonl file and its YAML (``dataset_path: json``
with the absolute path of the jsonl, so it loads offline from any working directory)."""

from __future__ import annotations

import json
import pathlib
import textwrap


def _write_task(root: pathlib.Path, name: str, docs: list[dict], body: str) -> str:
  """Writes ``root/NAME.jsonl`` (``docs``) and ``root/NAME.yaml`` (task ``name`` on that file's ``test`` split, then
  ``body``: the task's YAML from ``output_type`` on) and returns ``name``."""
  data = root / f"{name}.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (root / f"{name}.yaml").write_text(textwrap.dedent(f"""\
      task: {name}
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {data}
      test_split: test
      """) + textwrap.dedent(body))
  return name


def write_mc_task(root: pathlib.Path, name: str, docs: list[dict]) -> str:
  """Writes ``root/NAME.jsonl`` (``docs``: ``{"question", "choices", "label"}``) and ``root/NAME.yaml`` (task ``name``,
  metric acc) and returns ``name``."""
  return _write_task(root, name, docs, """\
      output_type: multiple_choice
      doc_to_text: "{{question}}"
      doc_to_choice: choices
      doc_to_target: label
      metric_list:
        - metric: acc
          aggregation: mean
          higher_is_better: true
      """)


def write_generate_task(root: pathlib.Path, name: str, docs: list[dict]) -> str:
  """Writes ``root/NAME.jsonl`` (``docs``: ``{"question", "answer"}``) and ``root/NAME.yaml`` (task ``name``: greedy
  generation of at most 6 tokens after the question, stopped at a newline or a full stop, metric exact match against
  the answer) and returns ``name``."""
  return _write_task(root, name, docs, """\
      output_type: generate_until
      doc_to_text: "{{question}}"
      doc_to_target: "{{answer}}"
      generation_kwargs:
        until: ["\\n", "."]
        max_gen_toks: 6
      metric_list:
        - metric: exact_match
          aggregation: mean
          higher_is_better: true
      """)
