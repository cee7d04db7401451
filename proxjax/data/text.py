r"""Text sources, a tokenizer wrapper, and calibration / evaluation token windows (docs/method.md, "Text sources" and "Evaluation protocol").

**Sources** (:func:`load_documents`), each a list of documents (strings) in a fixed order:

* ``"wiki"`` (offline): the MediaWiki dump shipped in the ``gensim`` wheel
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), main-namespace non-redirect pages
  converted to plain text by :func:`wiki_to_text`, articles of at least 500 characters kept (105 articles, 2.90 M
  characters with this filter; 79 calibration / 26 evaluation).
* ``"lee"`` (offline): ``lee_background.cor`` from the same wheel, one news article per line (300 articles).
* ``"c4"`` (Hugging Face ``allenai/c4``): calibration from ``en/c4-train.00000-of-01024.json.gz``, evaluation from
  ``en/c4-validation.00000-of-00008.json.gz`` (JSON lines, field ``"text"``).
* ``"wikitext2"`` (Hugging Face ``Salesforce/wikitext``, ``wikitext-2-raw-v1``): evaluation = the raw rows of
  ``test-00000-of-00001.parquet`` (paragraphs, headings and empty rows, as the protocol joins them); calibration =
  ``train-00000-of-00001.parquet`` regrouped into articles (:func:`wikitext_articles`).
* a local file: ``.txt`` is **one** document; ``.jsonl``/``.json`` (optionally ``.gz``) hold one JSON object per line
  with a ``"text"`` field; ``.parquet`` has a ``"text"`` column. The ``split`` argument is ignored for files.

**Offline split rule** (``"wiki"``, ``"lee"``): documents are numbered ``k = 0, 1, …`` in file order; document ``k``
is *evaluation* when ``k % 4 == 3`` and *calibration* otherwise (``split="all"`` gives all of them). The two splits
are disjoint, deterministic and both spread over the whole file.

**Where Hugging Face data comes from.** ``root=`` (or the environment variable ``PROXJAX_DATA_ROOT``) points at local
copies laid out exactly like the hub repositories, so no network is needed:

* ``root=DIR``: ``DIR`` is the copy of *this* source's repository (e.g. ``DIR/en/c4-validation.00000-of-00008.json.gz``
  for ``"c4"``, ``DIR/wikitext-2-raw-v1/test-00000-of-00001.parquet`` for ``"wikitext2"``);
* ``PROXJAX_DATA_ROOT=DIR``: ``DIR/<owner>/<name>`` is the copy of repository ``<owner>/<name>`` (e.g.
  ``DIR/allenai/c4/en/…``, ``DIR/Salesforce/wikitext/wikitext-2-raw-v1/…``), used when that folder exists;
* otherwise the hub itself. Either way the files are read with
  ``datasets.load_dataset(repo_or_dir, data_files={split: file}, split=split)``; the hub's C4 train shard (305 MB) is
  streamed when only its first ``max_documents`` documents are wanted (``streaming=`` overrides). Local copies are
  loaded plainly (``datasets`` converts them to Arrow in its cache, ``cache_dir=``).

**Calibration windows** (:func:`calibration_windows`): ``mode="random"`` is Wanda/SparseGPT's protocol (a random
document longer than ``seqlen`` tokens, a random window inside it, per sample); ``mode="packed"`` (the paper's) shuffles
the documents with the seed, appends EOS after each one, concatenates them into one stream
(:func:`packed_token_stream`) and cuts its first ``nsamples · seqlen`` tokens into consecutive, non-overlapping
windows. Text is never repeated: too little text is an error.

**Evaluation windows** (:func:`evaluation_windows`, protocol per source in :func:`evaluation_protocol`): the documents
joined with the protocol's joiner are tokenized **once** and cut into non-overlapping windows of ``seqlen`` tokens,
the tail dropped.
"""

from __future__ import annotations

import bz2
import gzip
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tokenizers

__all__ = [
    "LEE_FILE",
    "MIN_ARTICLE_CHARS",
    "WIKI_FILE",
    "EvalData",
    "check_source",
    "EvalProtocol",
    "TextTokenizer",
    "SOURCES",
    "calibration_windows",
    "evaluation_protocol",
    "evaluation_windows",
    "gensim_data_dir",
    "load_documents",
    "load_evaluation",
    "load_tokenizer",
    "packed_token_stream",
    "split_documents",
    "wiki_articles",
    "wiki_to_text",
    "wikitext_articles",
]

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


class TextTokenizer:
  """A ``tokenizers.Tokenizer`` plus its special-token ids: the only tokenizer interface proxjax needs.

  ``encode`` applies the tokenizer's own post-processor (``add_special_tokens=True``), exactly like a Hugging Face fast
  tokenizer: whether a BOS token is prepended is decided by ``tokenizer.json``, not here.

  Attributes:
    tokenizer: the wrapped ``tokenizers.Tokenizer``.
    eos_token_id: end-of-sequence id (the separator of packed calibration), or ``None`` if unknown.
    bos_token_id: beginning-of-sequence id, or ``None`` if unknown.
    vocab_size: the number of token ids, added tokens included.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token_id: int | None = None,
               bos_token_id: int | None = None, name: str = "in-memory tokenizer"):
    if not isinstance(tokenizer, tokenizers.Tokenizer):
      raise ValueError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    self.tokenizer = tokenizer
    self.name = name
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    for what, v in (("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id)):
      if v is not None and not (isinstance(v, (int, np.integer)) and 0 <= v < self.vocab_size):
        raise ValueError(f"{name}: {what}={v!r} is not a token id in [0, {self.vocab_size})")
    self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
    self.bos_token_id = None if bos_token_id is None else int(bos_token_id)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids of ``text`` (``int32``); the post-processor's special tokens are added unless
    ``add_special_tokens=False`` (then the ids are the text's tokens only)."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """:meth:`encode` of each text (one call into the Rust tokenizer, which may use several threads)."""
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
    """The text of ``ids`` (the tokenizer's decoder)."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

  def __repr__(self) -> str:
    return (f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
            f"bos_token_id={self.bos_token_id})")


def _token_content(v: Any) -> str | None:
  if isinstance(v, str):
    return v
  if isinstance(v, dict) and isinstance(v.get("content"), str):
    return v["content"]
  return None


def _special_id(model_dir: Path, tok: tokenizers.Tokenizer, which: str) -> int | None:
  """``which`` is ``"eos"`` or ``"bos"``: tokenizer_config.json, then special_tokens_map.json, then config.json."""
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    path = model_dir / fname
    if not path.is_file():
      continue
    try:
      cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    content = _token_content(cfg.get(f"{which}_token"))
    if content is not None:
      tid = tok.token_to_id(content)
      if tid is None:
        raise ValueError(f"{path}: {which}_token {content!r} is not in the vocabulary of "
                         f"{model_dir / 'tokenizer.json'}")
      return int(tid)
  path = model_dir / "config.json"
  if path.is_file():
    try:
      cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    v = cfg.get(f"{which}_token_id")
    if isinstance(v, list):
      v = v[0] if v else None
    if isinstance(v, int):
      return v
  return None


def _resolve_token(tok: tokenizers.Tokenizer, v: int | str | None, what: str) -> int | None:
  if v is None or isinstance(v, (int, np.integer)):
    return v
  tid = tok.token_to_id(v)
  if tid is None:
    raise ValueError(f"{what} {v!r} is not in the tokenizer's vocabulary")
  return int(tid)


def load_tokenizer(model_dir: str | os.PathLike | tokenizers.Tokenizer, *, eos_token: int | str | None = None,
                   bos_token: int | str | None = None) -> TextTokenizer:
  """Loads ``tokenizer.json`` from a model directory with the ``tokenizers`` library (no ``transformers``).

  The EOS/BOS ids come from ``tokenizer_config.json`` (``eos_token``/``bos_token``, a string or
  ``{"content": ...}``), else ``special_tokens_map.json``, else ``config.json`` (``eos_token_id``/``bos_token_id``);
  ``None`` if none of them says. ``eos_token``/``bos_token`` (a token string or id) override them.

  Args:
    model_dir: a directory holding ``tokenizer.json``, or an already built ``tokenizers.Tokenizer`` (then only the
      overrides give EOS/BOS).
    eos_token: optional EOS override (string or id).
    bos_token: optional BOS override (string or id).

  Returns:
    A :class:`TextTokenizer`.

  Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> t = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    >>> t.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = load_tokenizer(t, eos_token="</s>")
    >>> tok.encode("hello big world"), tok.eos_token_id, tok.vocab_size
    (array([2, 0, 3], dtype=int32), 1, 4)
  """
  if isinstance(model_dir, tokenizers.Tokenizer):
    tok, name, eos, bos = model_dir, "in-memory tokenizer", None, None
  else:
    d = Path(model_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
      raise ValueError(f"no tokenizer.json in model directory {d} (proxjax reads the fast-tokenizer file only)")
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
      raise ValueError(f"{path}: cannot be read by the tokenizers library ({e})") from e
    name, eos, bos = str(path), _special_id(d, tok, "eos"), _special_id(d, tok, "bos")
  if eos_token is not None:
    eos = _resolve_token(tok, eos_token, "eos_token")
  if bos_token is not None:
    bos = _resolve_token(tok, bos_token, "bos_token")
  return TextTokenizer(tok, eos_token_id=eos, bos_token_id=bos, name=name)


def _as_text_tokenizer(tokenizer: TextTokenizer | tokenizers.Tokenizer) -> TextTokenizer:
  if isinstance(tokenizer, TextTokenizer):
    return tokenizer
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return TextTokenizer(tokenizer)
  raise ValueError(f"expected a TextTokenizer (see load_tokenizer), got {type(tokenizer).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# Wiki markup → plain text
# ---------------------------------------------------------------------------------------------------------------------

# Extension elements whose *content* is not prose (removed with their content); other tags are dropped, content kept.
_DROP_ELEMENTS = ("ref", "references", "math", "chem", "ce", "gallery", "timeline", "score", "syntaxhighlight",
                  "source", "imagemap", "hiero", "graph", "templatedata", "mapframe", "maplink", "inputbox",
                  "categorytree")
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_RE_DROP_SELF = re.compile(r"<(?:%s)(?:\s[^<>]*)?/>" % "|".join(_DROP_ELEMENTS), re.I)
_RE_DROP_PAIR = re.compile(r"<(%s)(?:\s[^<>]*)?>.*?</\1\s*>" % "|".join(_DROP_ELEMENTS), re.I | re.S)
_RE_BLOCKS = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}", re.M)
_RE_WIKILINK = re.compile(r"\[\[|\]{2,}")
_RE_EXTLINK = re.compile(r"\[(?:(?:https?|ftp|irc|news|mailto):(?://)?|//)[^\s\[\]]+(?:[ \t]+([^\[\]\n]*))?\]", re.I)
_RE_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_RE_QUOTES = re.compile(r"'{2,}")
_RE_BR = re.compile(r"<br\s*/?>", re.I)
_RE_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_RE_LIST = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.M)
_RE_RULE = re.compile(r"^[ \t]*-{4,}[ \t]*$", re.M)
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_EMPTY_PARENS = re.compile(r"\([\s,;:]*\)")
_RE_SPACE_PUNCT = re.compile(r" +([,.;:!?)])")
_RE_OPEN_PAREN_SPACE = re.compile(r"\( +")
_LANG_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
_NO_TEXT_NAMESPACES = ("file", "image", "category", "media")


def _strip_blocks(text: str) -> str:
  """Removes templates ``{{…}}`` and tables ``{|…|}`` (lines starting with ``{|`` / ``|}``), nested in any order."""
  out, stack, pos = [], [], 0
  for m in _RE_BLOCKS.finditer(text):
    tok = m.group().strip()
    if not stack:
      out.append(text[pos:m.start()])
    if tok == "{{":
      stack.append("T")
    elif tok == "{|":
      stack.append("B")
    else:  # a closer: pop up to its opener; a stray closer (no such opener open) is dropped
      want = "T" if tok == "}}" else "B"
      if want in stack:
        while stack.pop() != want:
          pass
    pos = m.end()
  if not stack:  # an unclosed template or table swallows the rest of the text
    out.append(text[pos:])
  return "".join(out)


def _link_text(body: str) -> str:
  inline = body.startswith(":")  # [[:Category:X]] links to the page instead of categorizing
  if inline:
    body = body[1:]
  target, sep, label = body.partition("|")
  prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
  if not inline and prefix in _NO_TEXT_NAMESPACES:
    return ""
  if not inline and not sep and prefix and _LANG_PREFIX.fullmatch(prefix):
    return ""  # interlanguage link ([[de:Anarchismus]])
  if sep:
    label = label.strip()
    if label:
      return label
    target = re.sub(r"\s*\(.*?\)\s*$", "", target.split(":", 1)[-1])  # the pipe trick [[a (b)|]] → a
  return target.strip()


def _replace_links(text: str) -> str:
  """Replaces every ``[[…]]`` (nested ones innermost first) by :func:`_link_text`; unmatched brackets stay.

  A run of ``k`` closing brackets closes ``c = min(open links, k // 2)`` links; the ``k − 2c`` extra brackets are
  literal text of the innermost link (``[[File:a|[c. 1836]]]`` → caption ``[c. 1836]``).
  """
  levels: list[list[str]] = [[]]
  pos = 0
  for m in _RE_WIKILINK.finditer(text):
    levels[-1].append(text[pos:m.start()])
    tok = m.group()
    if tok == "[[":
      levels.append([])
    else:
      closes = min(len(levels) - 1, len(tok) // 2)
      levels[-1].append("]" * (len(tok) - 2 * closes))
      for _ in range(closes):
        body = "".join(levels.pop())
        levels[-1].append(_link_text(body))
    pos = m.end()
  levels[-1].append(text[pos:])
  while len(levels) > 1:  # an unclosed [[ stays literal
    inner = "".join(levels.pop())
    levels[-1].append("[[" + inner)
  return "".join(levels[0])


def wiki_to_text(markup: str) -> str:
  """Converts MediaWiki markup to plain text (proxjax's own small filter, not gensim's).

  In order: removes comments; ``<ref>`` (and ``<math>``, ``<gallery>``, … ) elements with their content; templates
  ``{{…}}`` and tables ``{|…|}`` (nested); external links ``[url text] → text`` (``[url]`` → nothing); wiki links,
  nested ones first, ``[[a|b]] → b``, ``[[a]] → a``, with file/image/media/category links (captions included) and
  interlanguage links (``[[de:…]]``) removed; headings ``== X == → X``; bold/italic quotes; ``<br>`` (→ space) and
  other HTML tags (content kept); list/indent markers and ``----``; magic words; HTML entities. Finally whitespace
  runs collapse to one space, empty parentheses left by removed templates go, spaces before ``, . ; : ! ? )`` go, and
  the non-empty lines (paragraphs) are joined with ``"\\n"``.

  Example:
    >>> wiki_to_text("'''Foo''' is a [[bar (x)|bar]]<ref>{{cite|a}}</ref> in [[Baz]].{{fact}}"
    ...              "\\n\\n== History ==\\nIt is [http://x.org old].")
    'Foo is a bar in Baz.\\nHistory\\nIt is old.'
  """
  t = _RE_COMMENT.sub("", markup)
  t = _RE_DROP_SELF.sub("", t)
  t = _RE_DROP_PAIR.sub("", t)
  t = _strip_blocks(t)
  t = _RE_EXTLINK.sub(lambda m: m.group(1) or "", t)
  t = _replace_links(t)
  t = _RE_EXTLINK.sub(lambda m: m.group(1) or "", t)  # external links whose text held a wiki link
  t = _RE_HEADING.sub(r"\2", t)
  t = _RE_QUOTES.sub("", t)
  t = _RE_BR.sub(" ", t)
  t = _RE_TAG.sub("", t)
  t = _RE_RULE.sub("", t)
  t = _RE_LIST.sub("", t)
  t = _RE_MAGIC.sub("", t)
  t = html.unescape(t)
  lines = []
  for line in t.split("\n"):
    line = " ".join(line.split())  # all Unicode whitespace (tabs, no-break spaces, …) → one space
    line = _RE_EMPTY_PARENS.sub("", line)
    line = _RE_OPEN_PAREN_SPACE.sub("(", line)
    line = _RE_SPACE_PUNCT.sub(r"\1", line)
    line = " ".join(line.split())
    if line:
      lines.append(line)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Offline corpora (gensim's test data)
# ---------------------------------------------------------------------------------------------------------------------

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
MIN_ARTICLE_CHARS = 500


def gensim_data_dir() -> Path:
  """``gensim/test/test_data`` of the installed gensim wheel (located without importing gensim).

  Raises ``ValueError`` if gensim is not installed.
  """
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the offline corpora 'wiki' and 'lee' are the test data of the gensim wheel, which is not "
                     "installed: pip install --no-deps gensim==4.4.0")
  d = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
  if not d.is_dir():
    raise ValueError(f"gensim is installed but has no test data folder {d}")
  return d


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


@lru_cache(maxsize=4)
def _wiki_articles_cached(path: str, min_chars: int) -> tuple[str, ...]:
  articles = []
  try:
    with bz2.open(path, "rb") as f:
      for _, elem in ET.iterparse(f, events=("end",)):
        if _local(elem.tag) != "page":
          continue
        ns, redirect, text = None, False, ""
        for child in elem:
          name = _local(child.tag)
          if name == "ns":
            ns = (child.text or "").strip()
          elif name == "redirect":
            redirect = True
          elif name == "revision":
            for sub in child:
              if _local(sub.tag) == "text":
                text = sub.text or ""
        elem.clear()
        if ns != "0" or redirect or text.lstrip()[:9].lower() == "#redirect":
          continue
        plain = wiki_to_text(text)
        if len(plain) >= min_chars:
          articles.append(plain)
  except (OSError, EOFError, ET.ParseError) as e:
    raise ValueError(f"{path}: not a readable bz2-compressed MediaWiki XML dump ({e})") from e
  return tuple(articles)


def wiki_articles(path: str | os.PathLike | None = None, *, min_chars: int = MIN_ARTICLE_CHARS) -> list[str]:
  """Plain-text articles of a bz2 MediaWiki XML dump, in dump order (parsed once per process, then cached).

  Keeps pages of namespace 0 that are not redirects, converts them with :func:`wiki_to_text` and keeps those with at
  least ``min_chars`` characters. ``path=None`` is the gensim wheel's dump (105 articles).
  """
  path = Path(gensim_data_dir() / WIKI_FILE if path is None else path)
  if not path.is_file():
    raise ValueError(f"wiki dump {path} does not exist")
  return list(_wiki_articles_cached(str(path.resolve()), int(min_chars)))


def split_documents(documents: Sequence[str], split: str, *, source: str = "documents") -> list[str]:
  """The deterministic offline split: document ``k`` is evaluation iff ``k % 4 == 3``.

  Args:
    documents: the documents in their fixed order.
    split: ``"calibration"`` (``k % 4 != 3``), ``"evaluation"`` (``k % 4 == 3``) or ``"all"``.
    source: a name for error messages.

  Example:
    >>> split_documents(list("abcdefgh"), "evaluation"), split_documents(list("abcdefgh"), "calibration")
    (['d', 'h'], ['a', 'b', 'c', 'e', 'f', 'g'])
  """
  if split == "all":
    return list(documents)
  if split == "evaluation":
    return [d for k, d in enumerate(documents) if k % 4 == 3]
  if split == "calibration":
    return [d for k, d in enumerate(documents) if k % 4 != 3]
  raise ValueError(f"{source}: unknown split {split!r} (use 'calibration', 'evaluation' or 'all')")


def _lee_documents() -> list[str]:
  path = gensim_data_dir() / LEE_FILE
  if not path.is_file():
    raise ValueError(f"lee corpus {path} does not exist")
  return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face sources
# ---------------------------------------------------------------------------------------------------------------------


class _HubSource(NamedTuple):
  repo: str
  files: dict[str, tuple[str, str]]  # our split → (HF split name, file inside the repo)
  stream_online: tuple[str, ...]  # our splits streamed from the hub when max_documents is given


_HUB_SOURCES = {
    "c4": _HubSource(
        "allenai/c4",
        {"calibration": ("train", "en/c4-train.00000-of-01024.json.gz"),
         "evaluation": ("validation", "en/c4-validation.00000-of-00008.json.gz")},
        ("calibration",)),
    "wikitext2": _HubSource(
        "Salesforce/wikitext",
        {"calibration": ("train", "wikitext-2-raw-v1/train-00000-of-00001.parquet"),
         "evaluation": ("test", "wikitext-2-raw-v1/test-00000-of-00001.parquet")},
        ()),
}

SOURCES = ("wiki", "lee", "c4", "wikitext2")
"""The named sources of :func:`load_documents` (besides local file paths)."""

_WIKITEXT_TITLE = re.compile(r"^ = [^=](?:.*[^=])? = \n?$")


def wikitext_articles(rows: Sequence[str]) -> list[str]:
  """Regroups WikiText rows into articles: a title row `` = Title = `` (one ``=``) starts a new article.

  WikiText rows are the lines of the original file, each ending in ``"\\n"``, except that blank lines are empty
  rows; an article is its rows concatenated with each empty row restored as ``"\\n"``, so
  ``"".join(wikitext_articles(rows)) == "".join(r or "\\n" for r in rows)`` and paragraphs stay separated by a blank
  line. Rows before the first title join the first article.

  Example:
    >>> wikitext_articles(["", " = A = \\n", "", " a1 \\n", " = = s = = \\n", " = B = \\n", "", " b \\n"])
    ['\\n = A = \\n\\n a1 \\n = = s = = \\n', ' = B = \\n\\n b \\n']
  """
  articles: list[list[str]] = [[]]
  has_text = False  # whether the current article has a non-blank row yet
  for row in rows:
    if has_text and _WIKITEXT_TITLE.match(row):
      articles.append([])
      has_text = False
    articles[-1].append(row or "\n")
    has_text = has_text or bool(row.strip())
  return ["".join(a) for a in articles if a]


def _hub_documents(source: str, split: str, root: str | os.PathLike | None, max_documents: int | None,
                   cache_dir: str | os.PathLike | None, streaming: bool | None) -> list[str]:
  spec = _HUB_SOURCES[source]
  if split not in spec.files:
    raise ValueError(f"{source}: unknown split {split!r} (use 'calibration' or 'evaluation')")
  hf_split, rel = spec.files[split]
  if root is None and os.environ.get("PROXJAX_DATA_ROOT"):
    mirror = Path(os.environ["PROXJAX_DATA_ROOT"]) / spec.repo
    if mirror.is_dir():
      root = mirror
  if root is not None:
    root = Path(root)
    if not (root / rel).is_file():
      raise ValueError(f"{source}: local copy of {spec.repo} at {root} lacks {rel} (expected {root / rel})")
    path, auto_stream = str(root), False
  else:
    path, auto_stream = spec.repo, max_documents is not None and split in spec.stream_online
  streaming = auto_stream if streaming is None else bool(streaming)
  import datasets  # deferred: importing datasets takes about a second

  try:
    ds = datasets.load_dataset(path, data_files={hf_split: rel}, split=hf_split, streaming=streaming,
                               cache_dir=None if cache_dir is None else str(cache_dir))
  except Exception as e:
    hint = "" if path != spec.repo else (
        f"; offline, point PROXJAX_DATA_ROOT at a directory holding {spec.repo}/{rel} (the hub layout), or use an "
        "offline source: wiki, lee or a local file")
    raise ValueError(f"{source}: cannot load {rel} from {path} ({type(e).__name__}: {e}){hint}") from e
  if ds.column_names is not None and "text" not in ds.column_names:  # a stream may not know its columns up front
    raise ValueError(f"{source}: {rel} in {path} has no 'text' column (columns: {ds.column_names})")
  if streaming:
    rows = ds if max_documents is None else ds.take(max_documents)
    try:
      return [r["text"] for r in rows]
    except KeyError as e:
      raise ValueError(f"{source}: {rel} in {path} has no 'text' column") from e
  n = len(ds) if max_documents is None else min(len(ds), max_documents)
  return list(ds[:n]["text"])


# ---------------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------------


def _file_documents(path: Path) -> list[str]:
  if not path.is_file():
    raise ValueError(f"text file {path} does not exist")
  name = path.name.lower()
  if name.endswith(".txt"):
    return [path.read_text(encoding="utf-8")]
  if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
    opener = gzip.open if name.endswith(".gz") else open
    docs = []
    try:
      with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not a JSON object per line ({e})") from e
          if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with a string field 'text'")
          docs.append(obj["text"])
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: cannot be read ({e})") from e
    return docs
  if name.endswith(".parquet"):
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
      table = pq.read_table(path)
    except Exception as e:
      raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    if "text" not in table.column_names:
      raise ValueError(f"{path}: no 'text' column (columns: {table.column_names})")
    return [t if t is not None else "" for t in table.column("text").to_pylist()]
  raise ValueError(f"{path}: unknown text file type (use .txt, .jsonl, .json, .jsonl.gz, .json.gz or .parquet)")


def _looks_like_path(source: str) -> bool:
  return os.sep in source or "/" in source or Path(source).suffix != "" or Path(source).exists()


_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def check_source(source: str | os.PathLike) -> None:
  """Raises ``ValueError`` unless ``source`` names a known text source (:data:`SOURCES`) or an existing file of a
  supported kind; nothing is read (a cheap check before any long work).

  Example:
    >>> check_source("lee")
    >>> check_source("wikitext3")
    Traceback (most recent call last):
    ValueError: unknown text source 'wikitext3': use one of wiki, lee, c4, wikitext2 or a path to a .txt, .jsonl, .json(.gz) or .parquet file
  """
  name = os.fspath(source)
  if name in SOURCES:
    return
  if not _looks_like_path(name):
    raise ValueError(f"unknown text source {name!r}: use one of {', '.join(SOURCES)} or a path to a .txt, .jsonl, "
                     ".json(.gz) or .parquet file")
  if not Path(name).is_file():
    raise ValueError(f"text file {name} does not exist")
  if not name.lower().endswith(_FILE_SUFFIXES):
    raise ValueError(f"text file {name}: unsupported kind (use {', '.join(_FILE_SUFFIXES)})")


def load_documents(source: str | os.PathLike, *, split: str = "evaluation", root: str | os.PathLike | None = None,
                   max_documents: int | None = None, cache_dir: str | os.PathLike | None = None,
                   streaming: bool | None = None) -> list[str]:
  """The documents of a named source or a local file, in their fixed order.

  Args:
    source: ``"wiki"``, ``"lee"``, ``"c4"``, ``"wikitext2"`` (see the module docstring) or a path to a ``.txt``
      (one document), ``.jsonl``/``.json``/``.jsonl.gz``/``.json.gz`` (one JSON object with ``"text"`` per line) or
      ``.parquet`` (``"text"`` column) file.
    split: ``"calibration"`` or ``"evaluation"`` (``"all"`` too for ``"wiki"``/``"lee"``); ignored for files.
    root: for ``"c4"``/``"wikitext2"``, a local directory laid out like the hub repository (see the module
      docstring; default: ``PROXJAX_DATA_ROOT``, else the hub).
    max_documents: keep only the first ``max_documents`` documents (of the split, in order).
    cache_dir: the ``datasets`` cache for ``"c4"``/``"wikitext2"`` (default: ``datasets``' own).
    streaming: for ``"c4"``/``"wikitext2"``, read with ``datasets``' streaming (no download of the whole file, no
      Arrow cache). Default ``None``: stream only the hub's C4 train shard, and only when ``max_documents`` is given.

  Returns:
    The documents. Empty strings are kept (WikiText's empty rows matter to its evaluation protocol), but a source
    without any non-empty document raises ``ValueError``; so do unknown names, missing files and unknown splits.

  Example:
    >>> docs = load_documents("lee", split="all")
    >>> len(docs), docs[0][:35]
    (300, 'Hundreds of people have been forced')
  """
  if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
    raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
  name = os.fspath(source)
  if name == "wiki":
    docs = split_documents(wiki_articles(), split, source="wiki")
  elif name == "lee":
    docs = split_documents(_lee_documents(), split, source="lee")
  elif name in _HUB_SOURCES:
    articles = name == "wikitext2" and split == "calibration"  # max_documents counts articles, not rows
    docs = _hub_documents(name, split, root, None if articles else max_documents, cache_dir, streaming)
    if articles:
      docs = wikitext_articles(docs)
  elif _looks_like_path(name):
    docs = _file_documents(Path(name))
  else:
    raise ValueError(f"unknown text source {name!r}: use one of {', '.join(SOURCES)} or a path to a .txt, .jsonl, "
                     f".json(.gz) or .parquet file")
  if max_documents is not None:
    docs = docs[:max_documents]
  if not any(d.strip() for d in docs):
    raise ValueError(f"text source {name!r} (split {split!r}) has no non-empty document")
  return docs


# ---------------------------------------------------------------------------------------------------------------------
# Calibration windows
# ---------------------------------------------------------------------------------------------------------------------


def _check_sizes(nsamples: int, seqlen: int) -> None:
  for what, v in (("nsamples", nsamples), ("seqlen", seqlen)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{what} must be a positive int, got {v!r}")


def _nonempty(documents: Sequence[str]) -> list[str]:
  if isinstance(documents, str):
    raise ValueError("documents must be a sequence of strings, got a single string (wrap it in a list)")
  docs = [d for d in documents if d.strip()]
  if not docs:
    raise ValueError("no non-empty document to take tokens from (empty corpus)")
  return docs


def packed_token_stream(tokenizer: TextTokenizer, documents: Sequence[str], *, seed: int = 0,
                        eos_id: int | None = None, min_tokens: int | None = None) -> np.ndarray:
  """The packed calibration stream: non-empty documents shuffled by ``seed``, each encoded and followed by EOS.

  The shuffle is ``numpy.random.default_rng(seed).permutation`` over the non-empty documents (in their given order).
  With ``min_tokens``, documents are tokenized (in batches) only until the stream is at least that long.

  Args:
    tokenizer: a :class:`TextTokenizer`.
    documents: the documents.
    seed: the shuffle seed.
    eos_id: the separator; default ``tokenizer.eos_token_id`` (``ValueError`` if that is ``None`` too).
    min_tokens: stop once the stream has at least this many tokens (``None``: tokenize everything).

  Returns:
    ``int32`` token ids, ``encode(d_{π(0)}) + [eos] + encode(d_{π(1)}) + [eos] + …``.
  """
  tokenizer = _as_text_tokenizer(tokenizer)
  eos = tokenizer.eos_token_id if eos_id is None else int(eos_id)
  if eos is None:
    raise ValueError(f"{tokenizer.name} has no EOS token to separate packed documents: pass eos_id=")
  docs = _nonempty(documents)
  order = np.random.default_rng(seed).permutation(len(docs))
  parts, total, start, chunk = [], 0, 0, 8
  sep = np.array([eos], np.int32)
  while start < len(order) and (min_tokens is None or total < min_tokens):
    for ids in tokenizer.encode_batch([docs[i] for i in order[start:start + chunk]]):
      parts += [ids, sep]
      total += ids.size + 1
    start, chunk = start + chunk, min(2 * chunk, 1024)  # growing batches: little overshoot past min_tokens
  return np.concatenate(parts)


def calibration_windows(tokenizer: TextTokenizer, documents: Sequence[str], *, nsamples: int, seqlen: int,
                        seed: int = 0, mode: str = "packed", eos_id: int | None = None) -> np.ndarray:
  """``nsamples`` calibration windows of ``seqlen`` tokens, deterministic for a seed.

  * ``mode="packed"`` (the paper's): the first ``nsamples · seqlen`` tokens of :func:`packed_token_stream` (documents
    shuffled by ``seed``, EOS after each), cut into consecutive non-overlapping windows. Too short a stream is a
    ``ValueError`` giving the tokens available and needed (text is never repeated).
  * ``mode="random"`` (Wanda/SparseGPT's): for each sample, a document drawn uniformly at random among those with
    **more** than ``seqlen`` tokens, and a window starting uniformly in ``[0, len − seqlen − 1]`` of its tokens
    (``numpy.random.default_rng(seed)``; documents are tokenized only when drawn; windows may overlap, as in Wanda).
    ``ValueError`` if no document is long enough.

  Empty documents are skipped. Special tokens come from ``tokenizer.encode`` (e.g. a BOS at each document start if
  ``tokenizer.json`` adds one).

  Returns:
    ``(nsamples, seqlen)`` ``int32``.

  Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> t = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<eos>"))
    >>> t.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = load_tokenizer(t, eos_token="<eos>")
    >>> calibration_windows(tok, ["a a a", "b b b b", "c"], nsamples=2, seqlen=4, seed=0).tolist()
    [[3, 0, 1, 1], [1, 0, 2, 2]]
  """
  tokenizer = _as_text_tokenizer(tokenizer)
  _check_sizes(nsamples, seqlen)
  need = int(nsamples) * int(seqlen)
  if mode == "packed":
    stream = packed_token_stream(tokenizer, documents, seed=seed, eos_id=eos_id, min_tokens=need)
    if stream.size < need:
      raise ValueError(f"packed calibration needs nsamples*seqlen = {nsamples}*{seqlen} = {need} tokens, but the "
                       f"{len(_nonempty(documents))} non-empty documents give only {stream.size} tokens (EOS "
                       f"separators included): use fewer or shorter samples or more text")
    return stream[:need].reshape(nsamples, seqlen).copy()
  if mode == "random":
    docs = _nonempty(documents)
    rng = np.random.default_rng(seed)
    candidates = list(range(len(docs)))  # documents not yet known to be too short
    cache: dict[int, np.ndarray] = {}
    out = np.empty((nsamples, seqlen), np.int32)
    for s in range(nsamples):
      while True:
        if not candidates:
          raise ValueError(f"random calibration needs a document with more than seqlen={seqlen} tokens, but none "
                           f"of the {len(docs)} non-empty documents has one: use mode='packed' (documents "
                           f"concatenated) or a shorter seqlen")
        j = int(rng.integers(len(candidates)))
        i = candidates[j]
        if i not in cache:
          cache[i] = tokenizer.encode(docs[i])
        ids = cache[i]
        if ids.size > seqlen:
          break
        candidates[j] = candidates[-1]  # too short: never draw it again (uniform over the long ones still holds)
        candidates.pop()
      start = int(rng.integers(ids.size - seqlen))
      out[s] = ids[start:start + seqlen]
    return out
  raise ValueError(f"unknown calibration mode {mode!r} (use 'packed' or 'random')")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation windows and their protocols
# ---------------------------------------------------------------------------------------------------------------------


class EvalData(NamedTuple):
  """Evaluation token windows and the protocol that produced them.

  Attributes:
    windows: ``(W, seqlen)`` ``int32``, non-overlapping consecutive windows of the tokenized text.
    tokens: the number of tokens kept, ``W · seqlen``.
    protocol: a dict describing source, split, documents, joiner, seqlen, windows, tokens, the tokens of the whole
      text (``stream_tokens``) and the limits applied; print it with every number.
  """

  windows: np.ndarray
  tokens: int
  protocol: dict


def evaluation_windows(tokenizer: TextTokenizer, documents: Sequence[str], *, seqlen: int, joiner: str = "\n\n",
                       max_tokens: int | None = None, max_windows: int | None = None,
                       source: str | None = None) -> EvalData:
  """Non-overlapping evaluation windows: ``joiner.join(documents)`` tokenized once, cut every ``seqlen`` tokens.

  The token stream is first truncated to ``max_tokens`` (if given), then cut into ``⌊n/seqlen⌋`` windows (the tail is
  dropped), of which the first ``max_windows`` (if given) are kept. The C4 rule of docs/method.md ("Evaluation protocol") "first 256 × seqlen tokens" is
  ``max_tokens=256*seqlen`` (equivalently ``max_windows=256``).

  Args:
    tokenizer: a :class:`TextTokenizer`.
    documents: the documents (all of them are joined, empty ones included).
    seqlen: the window length.
    joiner: the string between documents.
    max_tokens: optional cap on the tokens of the stream.
    max_windows: optional cap on the number of windows.
    source: a name recorded in the protocol.

  Returns:
    An :class:`EvalData`. ``ValueError`` if the text is empty or shorter than one window (both numbers given).

  Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> t = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    >>> t.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> ev = evaluation_windows(load_tokenizer(t), ["a b a", "b b"], seqlen=2)
    >>> ev.windows.tolist(), ev.tokens, ev.protocol["stream_tokens"]
    ([[1, 2], [1, 2]], 4, 5)
  """
  tokenizer = _as_text_tokenizer(tokenizer)
  _check_sizes(1, seqlen)
  for what, v in (("max_tokens", max_tokens), ("max_windows", max_windows)):
    if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
      raise ValueError(f"{what} must be a positive int or None, got {v!r}")
  if isinstance(documents, str):
    raise ValueError("documents must be a sequence of strings, got a single string (wrap it in a list)")
  docs = list(documents)
  name = source if source is not None else "documents"
  if not any(d.strip() for d in docs):
    raise ValueError(f"{name}: no non-empty document to evaluate on (empty corpus)")
  ids = tokenizer.encode(joiner.join(docs))
  stream_tokens = int(ids.size)
  if max_tokens is not None:
    ids = ids[:max_tokens]
  n_windows = ids.size // seqlen
  if n_windows == 0:
    raise ValueError(f"{name}: seqlen={seqlen} is longer than the evaluation text, which has only {ids.size} tokens"
                     + (f" (of {stream_tokens}, max_tokens={max_tokens})" if max_tokens is not None else ""))
  if max_windows is not None:
    n_windows = min(n_windows, max_windows)
  windows = ids[:n_windows * seqlen].reshape(n_windows, seqlen).copy()
  tokens = int(windows.size)
  protocol = {
      "source": name,
      "documents": len(docs),
      "joiner": joiner,
      "tokenizer": tokenizer.name,
      "seqlen": int(seqlen),
      "windows": int(n_windows),
      "tokens": tokens,
      "stream_tokens": stream_tokens,
      "max_tokens": max_tokens,
      "max_windows": max_windows,
  }
  return EvalData(windows, tokens, protocol)


class EvalProtocol(NamedTuple):
  """How a source is evaluated (docs/method.md, "Evaluation protocol").

  Attributes:
    source: the source name or path.
    split: the split of :func:`load_documents` used.
    joiner: the string between documents.
    max_documents: only the first ``max_documents`` documents (``None``: all).
    max_windows: at most this many windows, i.e. the first ``max_windows · seqlen`` tokens (``None``: all).
    description: one line for reports.
  """

  source: str
  split: str
  joiner: str
  max_documents: int | None
  max_windows: int | None
  description: str


def evaluation_protocol(source: str | os.PathLike) -> EvalProtocol:
  """The evaluation protocol of a source.

  * ``"wikitext2"``: test split, all rows joined with ``"\\n\\n"``, all windows.
  * ``"c4"``: validation shard 0, first 1100 documents joined with ``" "``, first ``256 · seqlen`` tokens.
  * ``"wiki"`` / ``"lee"`` (offline): the evaluation split (``k % 4 == 3``) joined with ``"\\n\\n"``, all windows.
  * a local file: all its documents (a ``.txt`` file is one) joined with ``"\\n\\n"``, all windows.

  Example:
    >>> evaluation_protocol("c4")[:5]
    ('c4', 'evaluation', ' ', 1100, 256)
  """
  name = os.fspath(source)
  if name == "wikitext2":
    return EvalProtocol(name, "evaluation", "\n\n", None, None,
                        "WikiText-2 raw test split (Salesforce/wikitext wikitext-2-raw-v1), rows joined with '\\n\\n'")
  if name == "c4":
    return EvalProtocol(name, "evaluation", " ", 1100, 256,
                        "C4 en validation shard 00000-of-00008, first 1100 documents joined with ' ', "
                        "first 256*seqlen tokens")
  if name in ("wiki", "lee"):
    what = "gensim enwiki dump articles" if name == "wiki" else "gensim lee_background.cor news articles"
    return EvalProtocol(name, "evaluation", "\n\n", None, None,
                        f"{what}, evaluation split (document k with k % 4 == 3), joined with '\\n\\n'")
  if _looks_like_path(name):
    return EvalProtocol(name, "evaluation", "\n\n", None, None, f"local file {name}, documents joined with '\\n\\n'")
  raise ValueError(f"unknown text source {name!r}: use one of {', '.join(SOURCES)} or a path to a text file")


def load_evaluation(tokenizer: TextTokenizer, source: str | os.PathLike, *, seqlen: int,
                    max_windows: int | None = None, root: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> EvalData:
  """Loads a source and builds its evaluation windows with its :func:`evaluation_protocol`.

  ``max_windows`` keeps only the first windows (on top of the protocol's own cap, e.g. C4's 256). The returned
  protocol dict also holds ``split`` and ``description``.
  """
  proto = evaluation_protocol(source)
  docs = load_documents(source, split=proto.split, root=root, max_documents=proto.max_documents, cache_dir=cache_dir)
  ev = evaluation_windows(tokenizer, docs, seqlen=seqlen, joiner=proto.joiner,
                          max_tokens=None if proto.max_windows is None else proto.max_windows * seqlen,
                          max_windows=max_windows, source=proto.source)
  ev.protocol.update(split=proto.split, description=proto.description)
  return ev
