"""The package's architecture, checked on its source with ``ast`` (nothing is imported).

* Layers: ``core`` → ``pruning`` → ``models``, ``data`` → ``pipeline`` → ``training`` → ``workflows`` → ``cli``;
  a module imports only from its own layer or the layers before it (``proxjax/__init__.py`` re-exports and is exempt).
* No module imports another module's private (``_name``) attributes, nor a private module.
* No import cycles between modules (imports inside functions count: they are cycles at run time).
* The command line does not import JAX at module level (``proxjax --help`` and argument errors stay fast).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "proxjax"
LAYERS = {"core": 0, "pruning": 1, "models": 2, "data": 2, "pipeline": 3, "training": 4, "workflows": 5, "cli": 6}


def _modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> tuple[set[str], list[str]]:
  """The proxjax modules ``path`` imports (anywhere in the file) and its private-name violations."""
  tree = ast.parse(path.read_text(), filename=str(path))
  me = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
  found: set[str] = set()
  problems: list[str] = []
  alias: dict[str, str] = {}

  def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")

  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "proxjax":
      if any(private(p) for p in node.module.split(".")):
        problems.append(f"{me}:{node.lineno} imports the private module {node.module}")
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        if sub in modules:
          found.add(sub)
          alias[a.asname or a.name] = sub
          if private(a.name):
            problems.append(f"{me}:{node.lineno} imports the private module {sub}")
        else:
          found.add(node.module)
          if private(a.name) and node.module != me:
            problems.append(f"{me}:{node.lineno} imports {node.module}.{a.name}")
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "proxjax":
          found.add(a.name)
          if any(private(p) for p in a.name.split(".")):
            problems.append(f"{me}:{node.lineno} imports the private module {a.name}")
          if a.asname:
            alias[a.asname] = a.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
        and node.value.id in alias and alias[node.value.id] != me):
      problems.append(f"{me}:{node.lineno} uses {alias[node.value.id]}.{node.attr}")
  return found, problems


def _layer(module: str) -> int | None:
  parts = module.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph(root: pathlib.Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
  modules = _modules(root)
  graph, problems = {}, []
  for mod, path in modules.items():
    deps, bad = _imports(path, modules)
    graph[mod] = {d for d in deps if d in modules and d != mod}
    problems += bad
  return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on: set[str] = set()
  out: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_module_is_in_a_layer():
  stray = [m for m in _modules() if m != "proxjax" and _layer(m) is None]
  assert not stray, f"modules outside the layered folders {sorted(LAYERS)}: {stray}"


def test_no_private_names_across_modules():
  _, problems = _graph()
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  graph, _ = _graph()
  # package __init__ files that re-export their own modules are not cycles of the design
  pruned = {m: {d for d in deps if not (d.startswith(m + ".") or m.startswith(d + "."))} for m, deps in graph.items()}
  assert not _cycles(pruned), _cycles(pruned)


def test_layers_import_only_downwards():
  graph, _ = _graph()
  bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m, deps in sorted(graph.items())
         for d in sorted(deps) if m != "proxjax" and _layer(m) is not None and _layer(d) is not None
         and _layer(d) > _layer(m)]
  assert not bad, "\n".join(bad)


def test_cli_imports_no_jax_at_module_level():
  for path in sorted((ROOT / "cli").rglob("*.py")):
    for node in ast.parse(path.read_text()).body:
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.split(".")[0] in ("jax", "flax", "optax", "numpy") for n in names), (path, names)


@pytest.mark.parametrize("source, expected", [
    ("from proxjax.core.nm import _check\n", "imports proxjax.core.nm._check"),
    ("from proxjax.core import nm\nnm._check(1)\n", "uses proxjax.core.nm._check"),
])
def test_the_checker_finds_private_use(tmp_path, source, expected):
  pkg = tmp_path / "proxjax"
  (pkg / "core").mkdir(parents=True)
  (pkg / "core" / "nm.py").write_text("def _check(x):\n  return x\n")
  (pkg / "core" / "user.py").write_text(source)
  modules = _modules(pkg)
  global ROOT  # the checker resolves module names against ROOT
  saved, ROOT = ROOT, pkg
  try:
    _, problems = _imports(pkg / "core" / "user.py", modules)
  finally:
    ROOT = saved
  assert any(expected in p for p in problems), problems


def test_the_checker_finds_cycles_and_upward_imports():
  graph = {"proxjax.core.a": {"proxjax.pruning.b"}, "proxjax.pruning.b": {"proxjax.core.a"}}
  assert _cycles(graph) == [["proxjax.core.a", "proxjax.pruning.b"]]
  assert _layer("proxjax.pruning.b") > _layer("proxjax.core.a")
