"""Runs the sharding tests of tests/mesh/ on 8 fake CPU devices, in one subprocess, and reports each case.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if it is set before JAX is imported, and it slows
the single-device tests, so the sharded cases run in their own Python process (one JAX start-up for all of them).
Each case of tests/mesh/test_*.py becomes one test here, passing or failing with the subprocess's message. The
subprocess starts right after collection (tests/conftest.py) and runs alongside the rest of the suite.
"""

import ast
import os
import pathlib
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest

MESH_DIR = pathlib.Path(__file__).parent / "mesh"


def _cases() -> list[str]:
  out = []
  for path in sorted(MESH_DIR.glob("test_*.py")):
    tree = ast.parse(path.read_text())
    out += [f"{path.stem}::{node.name}" for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
  return out


_RUN: dict[str, object] = {}  # the one background run of this session: {"proc", "report", "log"}


def start_mesh_run() -> None:
  """Starts the 8-device run in the background (once per session). tests/conftest.py calls this right after
  collection, so the subprocess works on the second core while the single-device tests run."""
  if _RUN:
    return
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="proxjax-mesh-"))
  env = dict(os.environ, PROXJAX_MESH_TESTS="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  log = open(tmp / "log.txt", "w+")  # noqa: SIM115 (closed when the results are read)
  _RUN.update(report=tmp / "junit.xml", log=log, proc=subprocess.Popen(
      [sys.executable, "-m", "pytest", str(MESH_DIR), "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m",
       "not slow", f"--junitxml={tmp / 'junit.xml'}"], env=env, stdout=log, stderr=subprocess.STDOUT,
      cwd=MESH_DIR.parent.parent))


@pytest.fixture(scope="module")
def mesh_results() -> dict[str, object]:
  start_mesh_run()
  proc, report, log = _RUN["proc"], _RUN["report"], _RUN["log"]
  try:
    proc.wait(timeout=1800)
  except subprocess.TimeoutExpired:
    proc.kill()
  log.seek(0)
  output = log.read()[-10000:]
  if not report.exists():
    pytest.fail(f"the 8-device test run produced no report (exit {proc.returncode}):\n{output}")
  results: dict[str, object] = {}
  for case in ET.parse(report).getroot().iter("testcase"):
    name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name').split('[')[0]}"
    bad = next(iter(list(case.iterfind("failure")) + list(case.iterfind("error"))), None)
    status = "failed" if bad is not None else ("skipped" if case.find("skipped") is not None else "passed")
    results.setdefault(name, []).append((status, "" if bad is None else (bad.text or bad.get("message") or "")))
  results["__output__"] = output
  return results


@pytest.mark.parametrize("case", _cases())
def test_on_8_devices(case, mesh_results):
  runs = mesh_results.get(case)
  if runs is None:
    pytest.fail(f"{case} did not run in the 8-device session:\n{mesh_results['__output__']}")
  failed = [text for status, text in runs if status == "failed"]
  if failed:
    pytest.fail(f"{case} failed on 8 devices:\n" + "\n".join(failed))
  if all(status == "skipped" for status, _ in runs):
    pytest.skip(f"{case} was skipped on 8 devices")
