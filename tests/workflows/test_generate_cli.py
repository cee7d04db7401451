"""``proxjax generate`` on the session's tiny checkpoint (tests/conftest.py): the printed continuation is
transformers' greedy ``generate`` decoded with the same tokenizer, ``--json`` holds it with the token counts and
the speed, and bad input exits with code 2 and one line (2 compiles: one prefill and one decode program)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from proxjax import cli, data  # noqa: E402

PROMPTS = ("The government said", "In")


def _hf_continuation(checkpoint, tok, text: str, n: int) -> list[int]:
  hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  ids = tok.encode(text).tolist()
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  new = out[0, len(ids):].tolist()
  return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def test_generate_prints_the_continuation_and_writes_json(checkpoint, tmp_path, capsys):
  tok = data.load_tokenizer(checkpoint)
  out_json = tmp_path / "gen.json"
  argv = ["generate", str(checkpoint), "--max-new-tokens", "8", "--json", str(out_json)]
  for p in PROMPTS:
    argv += ["--prompt", p]
  capsys.readouterr()
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  assert result["use_cache"] and result["max_new_tokens"] == 8 and result["eos_token_id"] == tok.eos_token_id == 0
  assert result["prompts_truncated"] == 0 and result["compute_dtype"] == "float32"
  for text, row in zip(PROMPTS, result["results"], strict=True):
    want = _hf_continuation(checkpoint, tok, text, 8)
    assert row["tokens"] == want and row["new_tokens"] == len(want) > 0
    assert row["prompt"] == text and row["prompt_tokens"] == len(tok.encode(text))
    assert row["continuation"] == tok.decode(want)
    assert row["stopped_by"] == ("length" if len(want) == 8 else "eos")
    assert text + row["continuation"] in printed
  assert result["generated_tokens"] == sum(r["new_tokens"] for r in result["results"])
  assert result["tokens_per_s"] > 0 and result["seconds"] > 0
  assert f"{result['generated_tokens']} tokens in" in printed


def test_generate_bad_input_exits_2(checkpoint, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
      (["generate", str(empty), "--prompt", "Hi"], "no config.json"),
      (["generate", str(tmp_path / "missing"), "--prompt", "Hi"], "not a directory"),
      (["generate", str(checkpoint)], "--prompt"),
      (["generate", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens"),
      (["generate", str(checkpoint), "--prompt", "Hi", "--batch-size", "0"], "--batch-size"),
  ]
  for argv, needle in cases:
    capsys.readouterr()
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, (argv, err)
