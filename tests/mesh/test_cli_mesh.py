"""``proxjax prune --mesh`` / ``--offload`` and ``proxjax eval --mesh`` on 8 fake CPU devices give the
single-device results (run through tests/test_mesh.py). Slow (two prunes and two evaluations compiled for 8 devices):
``-m slow`` runs it. The ``checkpoint`` and ``corpus`` fixtures are tests/conftest.py's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from proxjax import cli
from tests.support.cli import prune_cli


@pytest.mark.slow
def test_cli_prune_and_eval_on_a_mesh(checkpoint, corpus, tmp_path, capsys):
  outs = {}
  # (eval --mesh below covers loading straight into the mesh; prune here streams blocks from the host)
  for name, extra in [("one", []), ("mesh", ["--mesh", "data=2,model=4", "--offload"])]:
    out = tmp_path / name
    assert prune_cli(checkpoint, corpus, out, "--method", "wanda", *extra) == 0
    outs[name] = load_file(str(out / "model.safetensors"))
    report = json.loads((out / "proxjax-report.json").read_text())
    assert report["mesh"] == ({"data": 2, "model": 4} if name == "mesh" else None)
  for name in ("mesh",):
    assert outs[name].keys() == outs["one"].keys()
    for key, value in outs["one"].items():
      np.testing.assert_array_equal(outs[name][key], value, err_msg=f"{name} {key}")
  ppl = []
  for extra in ([], ["--mesh", "auto"]):
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "one"), "--dataset", str(corpus / "eval.txt"), "--seqlen", "32",
                     "--quiet", "--json", str(tmp_path / "ppl.json"), *extra]) == 0
    ppl.append(json.loads((tmp_path / "ppl.json").read_text())["ppl"])
  assert abs(ppl[0] - ppl[1]) <= 1e-5 * ppl[0], ppl
