r"""Offline zero-shot tasks built from the project's held-out text, shipped as lm-eval task folders
(docs/method.md, "Zero-shot task: lee_last_word").

**lee_last_word** is a LAMBADA-style last-word prediction task (the format of LAMBADA, not its data): each item is a
passage of one news article of the ``lee`` *evaluation* split (:func:`proxjax.data.load_documents`), cut just before a
word that already occurred earlier in the passage; the model is scored on that word. The rule that picks the items is
:func:`last_word_items`; :func:`lee_last_word_items` applies it to the corpus, and ``python -m proxjax.data.tasks``
rewrites the shipped ``lee_last_word/lee_last_word.jsonl`` (``--check`` only compares).

**lm-eval**: ``task_dir()`` is the whole interface; pass it as an include path::

    lm_eval.tasks.TaskManager(include_path=proxjax.data.tasks.task_dir())   # then tasks=["lee_last_word"]

The task YAML names its data with ``custom_dataset: !function proxjax.data.tasks.lee_last_word_dataset``, which
lm-eval imports as a module and which reads the jsonl next to this file, so the task works from any working directory
and needs neither a download nor a ``datasets`` cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LEE_LAST_WORD_FILE",
    "MAX_WORDS",
    "MIN_TARGET_LETTERS",
    "MIN_WORDS",
    "STOP_WORDS",
    "last_word_items",
    "lee_last_word_dataset",
    "lee_last_word_items",
    "main",
    "read_items",
    "split_sentences",
    "task_dir",
    "write_items",
]

_HERE = Path(__file__).resolve().parent
LEE_LAST_WORD_FILE = _HERE / "lee_last_word" / "lee_last_word.jsonl"
"""The shipped items of ``lee_last_word`` (one JSON object per line: ``context``, ``target``, ``doc``)."""

MIN_WORDS = 60
"""Fewest words of a passage (context and target)."""
MAX_WORDS = 250
"""Most words of a passage (context and target)."""
MIN_TARGET_LETTERS = 3
"""Fewest letters of a target word."""

STOP_WORDS = frozenset("""
a about above after again against all almost along already also although always am among an and another any are
around as at be became because been before being below between both but by can cannot could did do does doing done
down during each either else enough even ever every few for from further had has have having he her here hers herself
him himself his how however i if in into is it its itself just least less many may me might more most much must my
myself neither no nor not now of off often on once only or other others our ours ourselves out over own per perhaps
quite rather same shall she should since so some such than that the their theirs them themselves then there therefore
these they this those though through thus to too under until up upon us very was we were what whatever when where
whether which while who whom whose why will with within without would yet you your yours yourself yourselves
""".split())
"""English function words that are never targets (compared in lower case)."""

# A sentence ends after a word ending in . ! or ? (closing quotes or brackets may follow) when the next word starts with
# an upper-case letter, a digit or an opening quote, unless the word is a title abbreviation, a single letter or dotted
# initials ("U.S.").
_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_NEXT = re.compile(r"[A-Z0-9\"'\u201c\u2018(]")
_ABBREVIATIONS = frozenset("Mr Mrs Ms Dr St Jr Sr Prof Gen Col Lt Sgt Capt Rev Gov Sen Rep Co Corp Inc Ltd vs etc Mt "
                           "Ft No Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec".split())
_INITIALS = re.compile(r"[A-Za-z](?:\.[A-Za-z])*")
# A target candidate: ASCII letters, then at most one of . , ; : ! ? and closing quotes/brackets.
_CANDIDATE = re.compile(r"([A-Za-z]+)[.,;:!?]?[\"'\u201d\u2019)\]]*")
_LETTERS = re.compile(r"[A-Za-z]+")


def split_sentences(text: str) -> list[list[str]]:
  """The sentences of ``text``, each a list of its whitespace-separated words.

  A sentence ends after a word that ends in ``.``, ``!`` or ``?`` (closing quotes or brackets may follow) when the next
  word starts with an upper-case letter, a digit or an opening quote or bracket, unless the word without its final
  punctuation is a title or month abbreviation (``Mr``, ``Dr``, ``Jan``, …), a single letter or dotted initials
  (``U.S``). The last sentence ends with the text.

  Example:
    >>> split_sentences("Mr. Smith went to the U.S. on Monday. He left!  Then 3 more came.")
    [['Mr.', 'Smith', 'went', 'to', 'the', 'U.S.', 'on', 'Monday.'], ['He', 'left!'], ['Then', '3', 'more', 'came.']]
  """
  words = text.split()
  out: list[list[str]] = []
  cur: list[str] = []
  for i, w in enumerate(words):
    cur.append(w)
    m = _END.search(w)
    if m is None:
      continue
    stem = w[:m.start()]
    if i + 1 == len(words) or (_NEXT.match(words[i + 1]) and stem not in _ABBREVIATIONS
                               and not _INITIALS.fullmatch(stem)):
      out.append(cur)
      cur = []
  if cur:
    out.append(cur)
  return out


def _passage(sents: list[list[str]], j: int, q: int, max_words: int) -> tuple[int, int]:
  """(first sentence index, word count) of the passage ending with word ``q`` of sentence ``j``: whole preceding
  sentences are added, nearest first, while the count stays at most ``max_words``."""
  k, n = j, q + 1
  while k > 0 and n + len(sents[k - 1]) <= max_words:
    k -= 1
    n += len(sents[k])
  return k, n


def last_word_items(documents: Sequence[str], *, exclude: Sequence[str] = (), min_words: int = MIN_WORDS,
                    max_words: int = MAX_WORDS) -> list[dict[str, Any]]:
  """LAMBADA-style last-word items from documents: at most one per sentence, in document and sentence order.

  The rule, for each sentence ``S`` of each document (:func:`split_sentences`), trying the words of ``S`` from its
  last one backwards and taking the first word ``w`` at which all of these hold:

  1. ``w`` is a *candidate*: ASCII letters, optionally followed by one of ``. , ; : ! ?`` and closing quotes; the
     target ``t`` is its letters (the punctuation is removed). ``t`` has at least ``MIN_TARGET_LETTERS`` (3) letters
     and is not in ``STOP_WORDS`` (lower-cased).
  2. The *passage* is the sentences before ``S`` in the same document, taken whole, nearest first, as long as the
     total stays at most ``max_words`` words, followed by the words of ``S`` up to and including ``w`` (the rest of
     ``S`` is dropped). It has between ``min_words`` and ``max_words`` words (whitespace-separated, target included).
  3. ``t`` occurs in the context (the passage without ``w``) as a whole word, case-sensitively, where words are the
     maximal runs of ASCII letters (so ``Argentina's`` contains ``Argentina``).
  4. No sentence of the passage (``S`` whole included) is, whitespace-normalized, a sentence of a document in
     ``exclude`` (the calibration text stays out of the task).

  A document equal (whitespace-normalized) to an earlier one is skipped, as is an item equal to an earlier one.

  Args:
    documents: the documents, in order.
    exclude: documents whose sentences must not appear in any passage.
    min_words: fewest words of a passage.
    max_words: most words of a passage.

  Returns:
    One dict per item: ``context`` (the passage without its last word, words joined by single spaces), ``target``
    (the word; the request's continuation is ``" " + target``) and ``doc`` (the index of the document).

  Example:
    >>> doc = "The storm hit Darwin on Monday. Residents of Darwin were told to stay inside. Power returned to Darwin."
    >>> for item in last_word_items([doc], min_words=5):
    ...   print(item)
    {'context': 'The storm hit Darwin on Monday. Residents of', 'target': 'Darwin', 'doc': 0}
    {'context': 'The storm hit Darwin on Monday. Residents of Darwin were told to stay inside. Power returned to', \
'target': 'Darwin', 'doc': 0}
  """
  if isinstance(documents, str) or isinstance(exclude, str):
    raise ValueError("documents and exclude must be sequences of strings, not a single string (wrap it in a list)")
  if not (isinstance(min_words, int) and isinstance(max_words, int) and 2 <= min_words <= max_words):
    raise ValueError(f"need integers 2 <= min_words <= max_words, got min_words={min_words!r}, "
                     f"max_words={max_words!r}")
  excluded = {" ".join(s) for d in exclude for s in split_sentences(d)}
  seen_docs: set[str] = set()
  seen: set[tuple[str, str]] = set()
  items: list[dict[str, Any]] = []
  for i, doc in enumerate(documents):
    key = " ".join(doc.split())
    if not key or key in seen_docs:
      continue
    seen_docs.add(key)
    sents = split_sentences(doc)
    bad = [" ".join(s) in excluded for s in sents]
    for j, sent in enumerate(sents):
      for q in range(len(sent) - 1, -1, -1):
        m = _CANDIDATE.fullmatch(sent[q])
        if m is None:
          continue
        target = m.group(1)
        if len(target) < MIN_TARGET_LETTERS or target.lower() in STOP_WORDS:
          continue
        k, n = _passage(sents, j, q, max_words)
        if not min_words <= n <= max_words or any(bad[k:j + 1]):
          continue
        context = " ".join([w for s in sents[k:j] for w in s] + sent[:q])
        if target not in _LETTERS.findall(context) or (context, target) in seen:
          continue
        seen.add((context, target))
        items.append({"context": context, "target": target, "doc": i})
        break
  return items


def lee_last_word_items() -> list[dict[str, Any]]:
  """The items of ``lee_last_word``: :func:`last_word_items` of the ``lee`` evaluation split (75 articles), with the
  ``lee`` calibration split as ``exclude`` and the default lengths (60 to 250 words). ``doc`` indexes the evaluation
  split (article ``4 · doc + 3`` of ``lee_background.cor``)."""
  from proxjax.data.text import load_documents  # noqa: PLC0415  (reads the gensim wheel)

  return last_word_items(load_documents("lee", split="evaluation"), exclude=load_documents("lee", split="calibration"))


def write_items(items: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """Writes items as JSON lines (UTF-8, keys in item order, one object per line, ``\\n`` line ends)."""
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for item in items:
      f.write(json.dumps(item, ensure_ascii=False) + "\n")


def read_items(path: str | os.PathLike = LEE_LAST_WORD_FILE) -> list[dict[str, Any]]:
  """Reads JSON-lines items (default: the shipped ``lee_last_word`` file)."""
  p = Path(path)
  if not p.is_file():
    raise ValueError(f"no task data file {p}")
  with open(p, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def lee_last_word_dataset(**metadata: Any) -> Any:
  """The ``lee_last_word`` items as a ``datasets.DatasetDict`` with one split, ``"test"`` (in memory, no cache files).

  This is the task YAML's ``custom_dataset``; lm-eval passes the task's metadata as keyword arguments, which are
  ignored.
  """
  del metadata
  import datasets  # noqa: PLC0415  (heavy; only lm-eval needs it)

  return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items(LEE_LAST_WORD_FILE))})


def task_dir() -> str:
  """The directory to give lm-eval as an include path (``TaskManager(include_path=task_dir())`` or
  ``lm_eval --include_path``): it holds one folder per shipped task, each with its YAML (``lee_last_word``).

  Example:
    >>> import os
    >>> os.path.isfile(os.path.join(task_dir(), "lee_last_word", "lee_last_word.yaml"))
    True
  """
  return str(_HERE)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m proxjax.data.tasks [--check] [--out PATH]``: builds the ``lee_last_word`` items and writes them to
  the shipped file (or ``--out``); ``--check`` writes nothing and returns 1 if the shipped file differs."""
  import argparse  # noqa: PLC0415

  ap = argparse.ArgumentParser(prog="python -m proxjax.data.tasks", description=main.__doc__)
  ap.add_argument("--out", default=str(LEE_LAST_WORD_FILE), help="output jsonl (default: the shipped file)")
  ap.add_argument("--check", action="store_true", help="only compare with the shipped file")
  args = ap.parse_args(argv)
  items = lee_last_word_items()
  words = [len(it["context"].split()) + 1 for it in items]
  summary = (f"lee_last_word: {len(items)} items from {len({it['doc'] for it in items})} articles, passages of "
             f"{min(words)}-{max(words)} words (mean {sum(words) / len(words):.1f}), "
             f"{len({it['target'] for it in items})} distinct targets")
  if args.check:
    same = read_items(LEE_LAST_WORD_FILE) == items
    print(summary + ("; the shipped file is up to date" if same else f"; {LEE_LAST_WORD_FILE} DIFFERS"))
    return 0 if same else 1
  write_items(items, args.out)
  print(f"{summary}; written to {args.out}")
  return 0
