"""Runs the sharding tests of tests/mesh/ on 8 fake CPU devices, in one subprocess, and reports each case.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if it is set before JAX is imported, and it slows
the single-device tests, so the sharded cases run in their own Python process (one JAX start-up for all of them).
Each case of tests/mesh/test_*.py becomes one test here, passing or failing with the subprocess's message. The
subprocess starts right after collection (tests/conftest.py), runs exactly the selected cases, and runs alongside the
rest of the suite. The slowest cases (:data:`SLOW_CASES`, or marked ``slow`` in tests/mesh/) are marked ``slow`` here:
``-m slow`` runs them.
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


# Cases too slow for the default run (minutes on 2 cores, mostly compiling): marked ``slow`` here, so ``-m slow``
# selects them and the default ``-m "not slow"`` leaves them out. A ``@pytest.mark.slow`` on a test function in
# tests/mesh/ (or a ``pytestmark`` there) is picked up too; tests/mesh/test_proxsparse.py is listed by name.
SLOW_CASES: set[str] = set()  # cases to treat as slow without a mark in tests/mesh/ (none today)


def _is_slow_mark(node: ast.expr) -> bool:
  """``pytest.mark.slow`` (or a list/tuple containing it), as written in a decorator or ``pytestmark``."""
  if isinstance(node, (ast.List, ast.Tuple)):
    return any(_is_slow_mark(e) for e in node.elts)
  return ast.unparse(node) in ("pytest.mark.slow", "mark.slow")


def _cases() -> list[tuple[str, bool]]:
  """``(case, slow)`` for every test function of tests/mesh/test_*.py, ``case`` being ``"module::function"``."""
  out = []
  for path in sorted(MESH_DIR.glob("test_*.py")):
    tree = ast.parse(path.read_text())
    module_slow = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                      and _is_slow_mark(node.value) for node in tree.body)
    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
        case = f"{path.stem}::{node.name}"
        slow = module_slow or case in SLOW_CASES or any(_is_slow_mark(d) for d in node.decorator_list)
        out.append((case, slow))
  return out


def selected_cases(items) -> list[str]:
  """The cases of :func:`test_on_8_devices` among the collected (and not deselected) ``items``."""
  return [item.callspec.params["case"] for item in items
          if item.nodeid.split("::")[0].endswith("test_mesh.py") and hasattr(item, "callspec")]


_RUN: dict[str, object] = {}  # the one background run of this session: {"proc", "report", "log"}


def start_mesh_run(cases: list[str]) -> None:
  """Starts the 8-device run of ``cases`` (``"module::function"``) in the background, once per session.
  tests/conftest.py calls this right after collection (and deselection), so the subprocess runs exactly the selected
  cases, on the second core while the single-device tests run."""
  if _RUN or not cases:
    return
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="proxjax-mesh-"))
  env = dict(os.environ, PROXJAX_MESH_TESTS="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  log = open(tmp / "log.txt", "w+")  # noqa: SIM115 (closed when the results are read)
  node_ids = [f"{MESH_DIR / module}.py::{function}" for module, function in (c.split("::") for c in cases)]
  _RUN.update(report=tmp / "junit.xml", log=log, proc=subprocess.Popen(
      [sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
       f"--junitxml={tmp / 'junit.xml'}"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=MESH_DIR.parent.parent))


@pytest.fixture(scope="module")
def mesh_results(request) -> dict[str, object]:
  start_mesh_run(selected_cases(request.session.items))  # normally started already (tests/conftest.py)
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


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if slow else [], id=case)
                                  for case, slow in _cases()])
def test_on_8_devices(case, mesh_results):
  runs = mesh_results.get(case)
  if runs is None:
    pytest.fail(f"{case} did not run in the 8-device session:\n{mesh_results['__output__']}")
  failed = [text for status, text in runs if status == "failed"]
  if failed:
    pytest.fail(f"{case} failed on 8 devices:\n" + "\n".join(failed))
  if all(status == "skipped" for status, _ in runs):
    pytest.skip(f"{case} was skipped on 8 devices")
