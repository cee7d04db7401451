"""The ``proxjax prune`` command line on the session-wide tiny ``checkpoint`` and ``corpus`` (tests/conftest.py), with
the small calibration every CLI test uses (6 × 32 tokens, batches of 4, quiet)."""

from __future__ import annotations

from proxjax import cli


def prune_cli(checkpoint, corpus, out, *extra) -> int:
  """``proxjax prune CHECKPOINT OUT`` on ``corpus/calib.txt`` with ``extra`` arguments; returns the exit code."""
  return cli.main(["prune", str(checkpoint), str(out), "--calibration", str(corpus / "calib.txt"), "--nsamples", "6",
                   "--seqlen", "32", "--batch-size", "4", "--quiet", *extra])
