"""Shared pytest setup for the proxjax tests: environment, the 8-device run, and the session-wide tiny checkpoint."""

import json
import os

import pytest

# The brute-force prox reference (tests/support/prox_reference.py) runs many tiny L-BFGS-B problems; with a
# multi-threaded OpenBLAS each one pays thread start-up/synchronisation costs (about 10x slower on a busy machine). This
# must be set before NumPy/SciPy are imported, which is why it lives here; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# tests/mesh/ needs 8 fake CPU devices, which must be configured before JAX is imported: tests/test_mesh.py runs it
# in a subprocess with XLA_FLAGS set (and PROXJAX_MESH_TESTS=1); the main session does not collect it. (This file is
# also loaded by that subprocess, before tests/mesh/conftest.py: it must not import JAX at module level.)
collect_ignore = [] if os.environ.get("PROXJAX_MESH_TESTS") else ["mesh"]

TINY_VOCAB = 320
"""Vocabulary of the tiny checkpoint (its byte-level BPE tokenizer has at most this many tokens)."""


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `items` is what will run
def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
  """Starts the 8-device subprocess of tests/test_mesh.py early, for the cases of it that are selected, and moves
  those cases to the end of the run: the subprocess runs alongside everything else, and is waited for last."""
  from tests.support import mesh_run  # noqa: PLC0415  (imports no JAX)

  mesh = [item for item in items if item.nodeid.split("::")[0].endswith("test_mesh.py")]
  if mesh and not config.option.collectonly:
    mesh_run.start_mesh_run(mesh_run.selected_cases(mesh))
  items[:] = [item for item in items if item not in mesh] + mesh


# ------------------------------------------------------------------------------- the tiny checkpoint and corpus --
# Session-scoped: built once and shared by tests/workflows/, tests/training/ and tests/mesh/test_cli_mesh.py (pytest
# finds them here; no import is needed). Read-only for the tests that use them.


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """Calibration and evaluation text files from the offline news corpus (disjoint articles), an empty file and a
  too-short one."""
  from proxjax import data  # noqa: PLC0415

  root = tmp_path_factory.mktemp("text")
  lee = data.load_documents("lee", split="all")
  (root / "calib.txt").write_text("\n\n".join(lee[:40]))
  (root / "eval.txt").write_text("\n\n".join(lee[200:215]))
  (root / "empty.txt").write_text("  \n")
  (root / "short.txt").write_text("A few words only.")
  return root


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, corpus):
  """A tiny random Llama saved by transformers (tests/support/torch_llama.py's ``make_torch_model``, seed 3, with
  ``PIPELINE_SHAPES``), plus a byte-level BPE tokenizer trained on the calibration text."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  from tests.support.torch_llama import PIPELINE_SHAPES, make_torch_model  # noqa: PLC0415

  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  model = make_torch_model("llama", seed=3, vocab_size=TINY_VOCAB, bos_token_id=None, eos_token_id=0,
                           **PIPELINE_SHAPES)
  model.save_pretrained(path)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train([str(corpus / "calib.txt")], trainer)
  assert tok.get_vocab_size() <= TINY_VOCAB
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
  return path
