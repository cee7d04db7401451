"""Runs the sharding tests of tests/mesh/ on 8 fake CPU devices, in one subprocess, and reports each case.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only works if it is set before JAX is imported, and it slows
the single-device tests, so the sharded cases run in their own Python process (one JAX start-up for all of them).
Each case of tests/mesh/test_*.py becomes one test here, passing or failing with the subprocess's message. The
subprocess starts right after collection (tests/conftest.py), runs exactly the selected cases, and runs alongside the
rest of the suite (tests/conftest.py also puts these cases last, so that waiting for it costs least). The slowest
cases (``SLOW_CASES`` of tests/support/mesh_run.py, or marked ``slow`` in tests/mesh/) are marked ``slow`` here: ``-m
slow`` runs them.
"""

import xml.etree.ElementTree as ET

import pytest

from tests.support.mesh_run import cases, selected_cases, start_mesh_run, wait_mesh_run


@pytest.fixture(scope="module")
def mesh_results(request) -> dict[str, object]:
  start_mesh_run(selected_cases(request.session.items))  # normally started already (tests/conftest.py)
  report, output, exit_status = wait_mesh_run(timeout=1800)
  if not report.exists():
    pytest.fail(f"the 8-device test run produced no report (exit {exit_status}):\n{output}")
  results: dict[str, object] = {}
  for case in ET.parse(report).getroot().iter("testcase"):
    name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name').split('[')[0]}"
    bad = next(iter(list(case.iterfind("failure")) + list(case.iterfind("error"))), None)
    status = "failed" if bad is not None else ("skipped" if case.find("skipped") is not None else "passed")
    results.setdefault(name, []).append((status, "" if bad is None else (bad.text or bad.get("message") or "")))
  results["__output__"] = output
  return results


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if slow else [], id=case)
                                  for case, slow in cases()])
def test_on_8_devices(case, mesh_results):
  runs = mesh_results.get(case)
  if runs is None:
    pytest.fail(f"{case} did not run in the 8-device session:\n{mesh_results['__output__']}")
  failed = [text for status, text in runs if status == "failed"]
  if failed:
    pytest.fail(f"{case} failed on 8 devices:\n" + "\n".join(failed))
  if all(status == "skipped" for status, _ in runs):
    pytest.skip(f"{case} was skipped on 8 devices")
