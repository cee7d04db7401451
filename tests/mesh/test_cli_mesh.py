"""``proxjax prune --mesh`` / ``--offload``, ``proxjax eval --mesh`` and the lm-eval backend on 8 fake CPU devices
give the single-device results (run through tests/test_mesh.py). Slow (two prunes and two evaluations compiled for 8
devices; the backend's shapes compiled twice): ``-m slow`` runs them. The ``checkpoint`` and ``corpus`` fixtures are
tests/conftest.py's."""

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


@pytest.mark.slow
def test_harness_on_a_mesh(checkpoint):
  """The lm-eval backend on the 8-device mesh: batches of 4 rounded up to 8 rows, split over the devices, give the
  one-device log-likelihoods (1e-5) and is-greedy flags of 9 requests (one truncated to max_length)."""
  pytest.importorskip("lm_eval")
  from proxjax.core import sharding
  from proxjax.pipeline import harness

  rng = np.random.default_rng(0)
  reqs = [(None, rng.integers(1, 320, n).tolist(), rng.integers(1, 320, k).tolist())
          for n, k in [(5, 3), (30, 4), (60, 2), (1, 1), (47, 1), (48, 1), (12, 12), (20, 2), (9, 1)]]
  one = harness.ProxjaxLM(pretrained=str(checkpoint), batch_size=4, max_length=48)
  mesh = harness.ProxjaxLM(pretrained=str(checkpoint), batch_size=4, max_length=48, mesh=sharding.make_mesh())
  assert mesh.batch_size == 8 and one.batch_size == 4
  kernel = mesh.model.model.layers[0].mlp.up_proj.kernel[...]
  assert len(kernel.sharding.device_set) == 8  # loaded into its sharding
  a, b = one._loglikelihood_tokens(reqs, disable_tqdm=True), mesh._loglikelihood_tokens(reqs, disable_tqdm=True)
  np.testing.assert_allclose([ll for ll, _ in b], [ll for ll, _ in a], rtol=1e-5)
  assert [g for _, g in b] == [g for _, g in a]
