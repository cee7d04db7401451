"""The 8-device run of tests/mesh/ in a background subprocess: its cases, and starting it once per session.

tests/conftest.py starts it right after collection (:func:`start_mesh_run`) and tests/test_mesh.py reports its results,
one test per case. See tests/test_mesh.py for why it is a subprocess.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import tempfile
import time

MESH_DIR = pathlib.Path(__file__).resolve().parents[1] / "mesh"
REPO = MESH_DIR.parents[1]


# Cases too slow for the default run (minutes on 2 cores, mostly compiling): marked ``slow`` here, so ``-m slow``
# selects them and the default ``-m "not slow"`` leaves them out. A ``@pytest.mark.slow`` on a test function in
# tests/mesh/ (or a ``pytestmark`` there) is picked up too.
SLOW_CASES: set[str] = set()  # cases to treat as slow without a mark in tests/mesh/ (none today)


def _is_slow_mark(node: ast.expr) -> bool:
  """``pytest.mark.slow`` (or a list/tuple containing it), as written in a decorator or ``pytestmark``."""
  if isinstance(node, (ast.List, ast.Tuple)):
    return any(_is_slow_mark(e) for e in node.elts)
  return ast.unparse(node) in ("pytest.mark.slow", "mark.slow")


def cases() -> list[tuple[str, bool]]:
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


RUN: dict[str, object] = {}  # the one background run of this session: {"proc", "report", "log", "done"}


def _shared_dir() -> pathlib.Path | None:
  """Under pytest-xdist, a folder that every worker of this test run shares (named by the run's id), else ``None``."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  return None if uid is None else pathlib.Path(tempfile.gettempdir()) / f"proxjax-mesh-{uid}"


def start_mesh_run(selected: list[str]) -> None:
  """Starts the 8-device run of the ``selected`` cases (``"module::function"``) in the background, once per session.
  tests/conftest.py calls this right after collection (and deselection), so the subprocess runs exactly the selected
  cases alongside the single-device tests. Under pytest-xdist every worker collects and calls this; the first one
  to create ``started`` in the shared folder starts the run, the others only note where its results will be."""
  if RUN or not selected:
    return
  shared = _shared_dir()
  if shared is None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="proxjax-mesh-"))
  else:
    tmp = shared
    tmp.mkdir(exist_ok=True)
    try:
      os.close(os.open(tmp / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:  # another worker started it
      RUN.update(report=tmp / "junit.xml", log=tmp / "log.txt", done=tmp / "exit", proc=None)
      return
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
  env.update(PROXJAX_MESH_TESTS="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  node_ids = [f"{MESH_DIR / module}.py::{function}" for module, function in (c.split("::") for c in selected)]
  command = [sys.executable, "-m", "pytest", *node_ids, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             f"--junitxml={tmp / 'junit.xml'}"]
  with open(tmp / "log.txt", "w") as log:
    # the shell writes the exit status to `exit` once pytest is done: other workers wait for that file
    proc = subprocess.Popen(["/bin/sh", "-c", '"$@"; echo $? > "$0"', str(tmp / "exit"), *command], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  RUN.update(report=tmp / "junit.xml", log=tmp / "log.txt", done=tmp / "exit", proc=proc)


def wait_mesh_run(timeout: float = 1800.0) -> tuple[pathlib.Path, str, int | None]:
  """Waits for the run (this process's, or another xdist worker's) for at most ``timeout`` seconds; returns its
  junit report's path, the last 10,000 characters of its output, and its exit status (``None``: it did not end)."""
  proc, done = RUN["proc"], RUN["done"]
  deadline = time.monotonic() + timeout
  if proc is not None:
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
  while not done.exists() and time.monotonic() < deadline:
    time.sleep(0.5)
  status = done.read_text().strip() if done.exists() else ""
  output = RUN["log"].read_text(errors="replace")[-10000:]
  return RUN["report"], output, int(status) if status.isdigit() else None
