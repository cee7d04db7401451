"""Tests for proxjax.data: wiki markup filter, offline corpora, Hugging Face layouts, local files, token windows."""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from proxjax import data

# ---------------------------------------------------------------------------------------------------------------------
# A tiny in-memory tokenizer: words "w0".."w49" (ids 2..51), "<unk>" = 0, "<eos>" = 1.
# ---------------------------------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(50)]


def make_tokenizer(bos: bool = False) -> Tokenizer:
  vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  if bos:
    vocab["<s>"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if bos:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  return tok


@pytest.fixture(scope="module")
def tok() -> data.TextTokenizer:
  return data.load_tokenizer(make_tokenizer(), eos_token="<eos>")


def make_docs(lengths, seed=0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def is_slice(window: np.ndarray, ids: np.ndarray) -> bool:
  n = window.size
  return any(np.array_equal(ids[s:s + n], window) for s in range(ids.size - n + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Wiki markup filter
# ---------------------------------------------------------------------------------------------------------------------

SNIPPET = """{{Infobox person
| name = {{nowrap|Ada {{small|Lovelace}}}}
| image = Ada.jpg
}}
'''Ada Lovelace''' (born '''Augusta Ada Byron'''; 10 December 1815)<ref name="b">{{cite book|title=X}}</ref> \
was an English [[mathematician]] and [[Writer (occupation)|writer]].<ref name="b"/> \
She worked on [[Charles Babbage|Babbage's]] ''Analytical Engine''.<!-- a hidden comment -->

== Early life ==
[[File:Ada Lovelace portrait.jpg|thumb|Ada, painted by [[Margaret Carpenter]] [c. 1836]]]
Her father was [[Lord Byron]]&nbsp;(see [http://example.org/byron the poet]).{{citation needed|date=May 2016}}
{| class="wikitable"
|-
! Year !! Event
|-
| 1815 || {{birth date|1815|12|10}}
|}
* First item with <small>small</small> text
* Second item<br/>continued

=== Legacy ===
Her notes are famous.[http://example.org/notes]
[[Category:English mathematicians]]
[[de:Ada Lovelace]]
"""

SNIPPET_TEXT = """Ada Lovelace (born Augusta Ada Byron; 10 December 1815) was an English mathematician and writer. \
She worked on Babbage's Analytical Engine.
Early life
Her father was Lord Byron (see the poet).
First item with small text
Second item continued
Legacy
Her notes are famous."""


def test_wiki_to_text_exact():
  assert data.wiki_to_text(SNIPPET) == SNIPPET_TEXT


def test_wiki_to_text_pieces():
  assert data.wiki_to_text("a {{x|{{y|{{z}}}}}} b") == "a b"
  assert data.wiki_to_text("[[a|b]] [[c]] [[:Category:Foo|cats]] [[d (e)|]]") == "b c cats d"
  assert data.wiki_to_text("x [[Image:a.png|thumb|cap [[l]] [1]]] y") == "x y"
  assert data.wiki_to_text("x [[File:a.png|cap [[b|c]]]] y [[d]]") == "x y d"
  assert data.wiki_to_text("x<ref>r</ref><ref name=q/> y <math>{{a}}</math>.") == "x y."
  assert data.wiki_to_text("==== H4 ====\n''i'' '''b''' '''''bi'''''") == "H4\ni b bi"
  assert data.wiki_to_text("{{unclosed template\ntext") == ""
  assert data.wiki_to_text("a }} stray") == "a stray"


@lru_cache(maxsize=1)
def real_wiki() -> tuple[str, ...]:
  return tuple(data.wiki_articles())


def test_real_wiki_dump():
  arts = real_wiki()
  assert 80 <= len(arts) <= 130, len(arts)
  assert all(len(a) >= data.MIN_ARTICLE_CHARS for a in arts)
  text = "\n".join(arts)
  for junk in ("{{", "}}", "[[", "]]", "<ref", "{|", "&nbsp;", "&amp;", "thumb|"):
    assert junk not in text, junk
  assert arts[0].startswith("Anarchism is a political philosophy")
  assert 2_000_000 < len(text) < 4_000_000


def test_wiki_splits_disjoint_and_deterministic():
  cal = data.load_documents("wiki", split="calibration")
  ev = data.load_documents("wiki", split="evaluation")
  arts = list(real_wiki())
  assert ev == arts[3::4] and len(cal) + len(ev) == len(arts)
  assert not set(cal) & set(ev)
  assert data.load_documents("wiki", split="evaluation") == ev
  assert sum(map(len, ev)) > 16 * 512 * 6  # far more than 16 windows of 512 tokens (< 6 characters per token)
  assert data.load_documents("wiki", split="all") == arts


def test_lee_corpus():
  docs = data.load_documents("lee", split="all")
  assert len(docs) == 300 and all(d.strip() == d and d for d in docs)
  ev, cal = data.load_documents("lee"), data.load_documents("lee", split="calibration")
  assert (len(cal), len(ev)) == (225, 75) and ev == docs[3::4]
  assert not set(cal) & set(ev)


def test_unknown_sources_and_splits(tmp_path):
  with pytest.raises(ValueError, match="unknown text source 'c5'"):
    data.load_documents("c5")
  with pytest.raises(ValueError, match="unknown split 'test'"):
    data.load_documents("lee", split="test")
  with pytest.raises(ValueError, match="does not exist"):
    data.load_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="unknown split"):
    data.load_documents("c4", split="all", root=tmp_path)
  with pytest.raises(ValueError, match="unknown text source"):
    data.evaluation_protocol("c5")


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face layouts (the online code path, pointed at local copies)
# ---------------------------------------------------------------------------------------------------------------------


def write_c4(repo_dir, name, texts):
  path = repo_dir / "en" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")


def write_wikitext(repo_dir, split, rows):
  path = repo_dir / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({"text": rows}), path)


C4_VAL = make_docs([3] * 1200, seed=1)
C4_TRAIN = make_docs([5, 40, 7, 60, 2], seed=2)
WT_TEST = ["", " = Robert Boulter = \n", "", " w1 w2 w3 \n", "", " = = Career = = \n", "", " w4 w5 \n", "",
           " = Other = \n", "", " w6 \n"]
WT_TRAIN = ["", " = A = \n", "", " w1 w2 \n", " = B = \n", "", " w3 \n"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  c4, wt = root / "allenai" / "c4", root / "Salesforce" / "wikitext"
  write_c4(c4, "c4-validation.00000-of-00008.json.gz", C4_VAL)
  write_c4(c4, "c4-train.00000-of-01024.json.gz", C4_TRAIN)
  write_wikitext(wt, "test", WT_TEST)
  write_wikitext(wt, "train", WT_TRAIN)
  write_wikitext(wt, "validation", [" = V = \n"])
  return root


def test_c4_layout(hub, tmp_path):
  kw = dict(root=hub / "allenai" / "c4", cache_dir=tmp_path)
  assert data.load_documents("c4", split="evaluation", **kw) == C4_VAL
  assert data.load_documents("c4", split="calibration", **kw) == C4_TRAIN
  assert data.load_documents("c4", split="evaluation", max_documents=7, **kw) == C4_VAL[:7]
  # the streaming path (used online for the 305 MB train shard) on the same files
  assert data.load_documents("c4", split="calibration", max_documents=3, streaming=True, **kw) == C4_TRAIN[:3]


def test_wikitext_layout(hub, tmp_path):
  kw = dict(root=hub / "Salesforce" / "wikitext", cache_dir=tmp_path)
  assert data.load_documents("wikitext2", split="evaluation", **kw) == WT_TEST  # raw rows, empty ones included
  cal = data.load_documents("wikitext2", split="calibration", **kw)
  assert cal == ["\n = A = \n\n w1 w2 \n", " = B = \n\n w3 \n"]
  assert "".join(cal) == "".join(r or "\n" for r in WT_TRAIN)
  assert data.load_documents("wikitext2", split="calibration", max_documents=1, **kw) == cal[:1]


def test_data_root_env_var(hub, tmp_path, monkeypatch):
  monkeypatch.setenv("PROXJAX_DATA_ROOT", str(hub))
  assert data.load_documents("wikitext2", cache_dir=tmp_path) == WT_TEST
  assert data.load_documents("c4", cache_dir=tmp_path, max_documents=3) == C4_VAL[:3]


def test_missing_hub_file(tmp_path):
  (tmp_path / "en").mkdir()
  with pytest.raises(ValueError, match=re.escape("en/c4-validation.00000-of-00008.json.gz")):
    data.load_documents("c4", root=tmp_path, cache_dir=tmp_path)


def test_c4_protocol_takes_first_1100_docs_and_256_windows(hub, tmp_path, tok):
  ev = data.load_evaluation(tok, "c4", seqlen=8, root=hub / "allenai" / "c4", cache_dir=tmp_path)
  expected = tok.encode(" ".join(C4_VAL[:1100]))  # 3300 tokens: more than 256 * 8
  assert ev.windows.shape == (256, 8) and ev.tokens == 2048
  np.testing.assert_array_equal(ev.windows.reshape(-1), expected[:2048])
  p = ev.protocol
  assert (p["documents"], p["joiner"], p["stream_tokens"], p["split"]) == (1100, " ", 3300, "evaluation")
  assert "first 1100 documents" in p["description"]


def test_wikitext_protocol(hub, tmp_path, tok):
  ev = data.load_evaluation(tok, "wikitext2", seqlen=2, root=hub / "Salesforce" / "wikitext", cache_dir=tmp_path)
  ids = tok.encode("\n\n".join(WT_TEST))
  assert ev.protocol["joiner"] == "\n\n" and ev.protocol["documents"] == len(WT_TEST)
  np.testing.assert_array_equal(ev.windows.reshape(-1), ids[:ids.size // 2 * 2])


# ---------------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------------


def test_local_files(tmp_path):
  (tmp_path / "a.txt").write_text("line one\n\nline two\n", encoding="utf-8")
  assert data.load_documents(str(tmp_path / "a.txt")) == ["line one\n\nline two\n"]
  rows = [{"text": "x y"}, {"text": "z", "url": "u"}]
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
  assert data.load_documents(tmp_path / "b.jsonl") == ["x y", "z"]
  with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
  assert data.load_documents(tmp_path / "c.json.gz", split="calibration") == ["x y", "z"]
  pq.write_table(pa.table({"text": ["p", "", "q"]}), tmp_path / "d.parquet")
  assert data.load_documents(tmp_path / "d.parquet") == ["p", "", "q"]
  assert data.evaluation_protocol(str(tmp_path / "a.txt")).joiner == "\n\n"


def test_local_file_errors(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected a JSON object with a string field 'text'"):
    data.load_documents(tmp_path / "bad.jsonl")
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
  with pytest.raises(ValueError, match=r"e.parquet: no 'text' column"):
    data.load_documents(tmp_path / "e.parquet")
  (tmp_path / "f.csv").write_text("text\nx\n")
  with pytest.raises(ValueError, match="unknown text file type"):
    data.load_documents(tmp_path / "f.csv")
  (tmp_path / "empty.txt").write_text(" \n\n")
  with pytest.raises(ValueError, match="no non-empty document"):
    data.load_documents(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def test_load_tokenizer_from_directory(tmp_path):
  with pytest.raises(ValueError, match=f"no tokenizer.json in model directory {re.escape(str(tmp_path))}"):
    data.load_tokenizer(tmp_path)
  make_tokenizer(bos=True).save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 7], "bos_token_id": 52}))
  t = data.load_tokenizer(tmp_path)
  assert (t.eos_token_id, t.bos_token_id, t.vocab_size) == (1, 52, 53)
  assert t.encode("w0 w1 zz").tolist() == [52, 2, 3, 0]  # the post-processor adds BOS
  assert t.encode("w0").dtype == np.int32 and t.decode([2, 3]) == "w0 w1"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "w9"}, "bos_token": None}))
  t = data.load_tokenizer(tmp_path)
  assert (t.eos_token_id, t.bos_token_id) == (11, 52)  # tokenizer_config wins, config.json fills the gap
  assert data.load_tokenizer(tmp_path, eos_token=1).eos_token_id == 1
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nope>"}))
  with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '</nope>' is not in the vocabulary"):
    data.load_tokenizer(tmp_path)
  assert data.load_tokenizer(make_tokenizer()).eos_token_id is None


# ---------------------------------------------------------------------------------------------------------------------
# Calibration windows
# ---------------------------------------------------------------------------------------------------------------------

DOCS = make_docs([30, 3, 55, 12, 80, 0, 41, 7, 64, 25], seed=3)


def test_packed_windows(tok):
  w = data.calibration_windows(tok, DOCS, nsamples=6, seqlen=40, seed=5)
  assert w.shape == (6, 40) and w.dtype == np.int32
  np.testing.assert_array_equal(w, data.calibration_windows(tok, DOCS, nsamples=6, seqlen=40, seed=5))
  assert not np.array_equal(w, data.calibration_windows(tok, DOCS, nsamples=6, seqlen=40, seed=6))
  stream = data.packed_token_stream(tok, DOCS, seed=5)
  np.testing.assert_array_equal(w.reshape(-1), stream[:240])  # consecutive, non-overlapping slices of the stream
  # the stream is every non-empty document exactly once, each followed by EOS (= 1)
  assert stream[-1] == 1
  pieces = np.split(stream, np.flatnonzero(stream == 1) + 1)[:-1]
  got = sorted(tuple(p[:-1]) for p in pieces)
  assert got == sorted(tuple(tok.encode(d)) for d in DOCS if d)
  orders = {tuple(data.packed_token_stream(tok, DOCS, seed=s)[:5]) for s in range(6)}
  assert len(orders) > 1  # the seed shuffles the documents


def test_packed_windows_too_little_text(tok):
  total = sum(len(d.split()) + 1 for d in DOCS if d)  # 317 words + 9 EOS
  assert data.calibration_windows(tok, DOCS, nsamples=1, seqlen=total).shape == (1, total)
  with pytest.raises(ValueError, match=f"needs nsamples\\*seqlen = 2\\*{total} = {2 * total} tokens.*only {total}"):
    data.calibration_windows(tok, DOCS, nsamples=2, seqlen=total)
  with pytest.raises(ValueError, match="no EOS token"):
    data.calibration_windows(data.load_tokenizer(make_tokenizer()), DOCS, nsamples=1, seqlen=4)
  w = data.calibration_windows(data.load_tokenizer(make_tokenizer()), DOCS, nsamples=1, seqlen=4, eos_id=0)
  assert w.shape == (1, 4)


def test_random_windows(tok):
  w = data.calibration_windows(tok, DOCS, nsamples=20, seqlen=50, seed=1, mode="random")
  assert w.shape == (20, 50) and w.dtype == np.int32
  np.testing.assert_array_equal(w, data.calibration_windows(tok, DOCS, nsamples=20, seqlen=50, seed=1, mode="random"))
  assert not np.array_equal(w, data.calibration_windows(tok, DOCS, nsamples=20, seqlen=50, seed=2, mode="random"))
  long_docs = [tok.encode(d) for d in DOCS if len(d.split()) > 50]  # 55, 80, 64 tokens
  for row in w:
    # a contiguous slice of a long-enough document that stops before its last token (Wanda's start range)
    assert any(is_slice(row, ids[:-1]) for ids in long_docs)
  assert len({tuple(r) for r in w}) > 5


def test_random_windows_none_long_enough(tok):
  with pytest.raises(ValueError, match="more than seqlen=80 tokens.*mode='packed'"):
    data.calibration_windows(tok, DOCS, nsamples=2, seqlen=80, mode="random")  # the longest has exactly 80


def test_calibration_errors(tok):
  with pytest.raises(ValueError, match="empty corpus"):
    data.calibration_windows(tok, ["", "  "], nsamples=1, seqlen=2)
  with pytest.raises(ValueError, match="empty corpus"):
    data.calibration_windows(tok, [], nsamples=1, seqlen=2, mode="random")
  with pytest.raises(ValueError, match="unknown calibration mode"):
    data.calibration_windows(tok, DOCS, nsamples=1, seqlen=2, mode="sliding")
  with pytest.raises(ValueError, match="nsamples must be a positive int"):
    data.calibration_windows(tok, DOCS, nsamples=0, seqlen=2)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation windows
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluation_windows(tok):
  ids = tok.encode("\n\n".join(DOCS))
  assert ids.size == 317
  ev = data.evaluation_windows(tok, DOCS, seqlen=50, source="toy")
  assert ev.windows.shape == (6, 50) and ev.tokens == 300 and ev.windows.dtype == np.int32
  np.testing.assert_array_equal(ev.windows.reshape(-1), ids[:300])  # non-overlapping, tail of 17 dropped
  p = ev.protocol
  assert (p["source"], p["seqlen"], p["windows"], p["tokens"], p["stream_tokens"]) == ("toy", 50, 6, 300, 317)
  assert data.evaluation_windows(tok, DOCS, seqlen=50, max_tokens=120).windows.shape == (2, 50)
  assert data.evaluation_windows(tok, DOCS, seqlen=50, max_windows=4).windows.shape == (4, 50)
  ev = data.evaluation_windows(tok, DOCS, seqlen=10, joiner=" ")
  np.testing.assert_array_equal(ev.windows.reshape(-1), tok.encode(" ".join(DOCS))[:310])


def test_evaluation_errors(tok):
  with pytest.raises(ValueError, match="seqlen=318 is longer than the evaluation text, which has only 317 tokens"):
    data.evaluation_windows(tok, DOCS, seqlen=318)
  with pytest.raises(ValueError, match="empty corpus"):
    data.evaluation_windows(tok, ["", " "], seqlen=2)
  with pytest.raises(ValueError, match="single string"):
    data.evaluation_windows(tok, "w1 w2 w3", seqlen=2)


def test_offline_eval_protocols(tok):
  p = data.evaluation_protocol("lee")
  assert (p.split, p.joiner, p.max_documents, p.max_windows) == ("evaluation", "\n\n", None, None)
  assert data.evaluation_protocol("wikitext2").joiner == "\n\n"
  ev = data.load_evaluation(tok, "lee", seqlen=512)  # every word is <unk> here, but the counting is real
  assert ev.windows.shape[0] >= 16 and ev.protocol["documents"] == 75
