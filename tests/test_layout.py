"""The package's layout rules (docs/DESIGN.md), checked on the source with ``ast``:

* imports only point down: every module has a layer, and no module imports (at top level or inside a
  function) a module of a higher layer; hence no import cycle;
* only ``checkpointing/orbax_io.py`` imports Orbax; TFDS and grain only the input pipeline; only
  ``main.py`` reads absl flags; TensorFlow nowhere;
* no function over 80 lines outside network definitions (``models/``, ``evaluation/inception.py``).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "patch_diffusion"

#: Layer of every module (dotted, without the ``patch_diffusion.`` prefix); a glob ``x.*`` covers a
#: package. A module may import only modules of its own layer or below.
LAYERS: list[tuple[str, ...]] = [
    # 0: no project imports
    ("user_cache", "fileio", "progress", "lazy", "runtime"),
    # 1: pure numerics and small utilities
    ("image_grid", "parallel", "edm.*", "data.patches", "data.preprocess", "data.augment", "models.*",
     "state", "evaluation.inception", "evaluation.fid"),
    # 2: components with I/O or compiled functions
    ("steps", "sampling", "interop.*", "checkpointing.*", "run_lock", "writers", "config_validation",
     "configs_io", "data.image_folder", "evaluation.inception_weights", "evaluation.reference",
     "evaluation.evaluator", "tools.cli"),
    # 3: data sources and pipelines
    ("data.datasets", "data.input_pipeline", "data.latents"),
    # 4: what a run is made of, and what the loop calls
    ("experiment", "hooks", "vae_training"),
    # 5: the modes
    ("train", "generate", "evaluate"),
    # 6: entry points
    ("main", "tools.*"),
]

#: Facade packages (``patch_diffusion``, ``data``, ``evaluation``: lazy re-exports) sit at the top.
TOP = len(LAYERS)


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PKG).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def layer(name: str) -> int:
  best = None
  for i, group in enumerate(LAYERS):
    for pattern in group:
      if pattern == name or (pattern.endswith(".*") and (name + ".").startswith(pattern[:-1])):
        # An exact name wins over a package glob (tools.cli vs tools.*).
        if best is None or pattern == name:
          best = i
  if best is None:
    raise AssertionError(f"module patch_diffusion.{name} has no layer: add it to LAYERS in {__file__}")
  return best


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: pathlib.Path) -> list[tuple[str, int]]:
  """(imported module without the package prefix, line) for every patch_diffusion import, at any depth."""
  tree = ast.parse(path.read_text())
  own = module_name(path)
  package = own if path.name == "__init__.py" else own.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name[len("patch_diffusion."):], node.lineno) for a in node.names
              if a.name.startswith("patch_diffusion.")]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(filter(None, package.split(".")[:len(package.split(".")) - node.level + 1] + [base]))
      elif base == "patch_diffusion" or base.startswith("patch_diffusion."):
        base = base[len("patch_diffusion."):] if base != "patch_diffusion" else ""
      else:
        continue
      for a in node.names:  # `from patch_diffusion.x import y`: y may be a submodule or a name in x
        sub = f"{base}.{a.name}" if base else a.name
        out.append((sub if sub in MODULES else base, node.lineno))
  return [(m, line) for m, line in out if m]


MODULES = modules()


def test_every_module_has_a_layer():
  for name in MODULES:
    if not name:
      continue
    if pathlib.Path(MODULES[name]).name != "__init__.py":
      layer(name)


def test_imports_only_point_down():
  bad = []
  for name, path in MODULES.items():
    if path.name == "__init__.py":
      continue
    mine = layer(name)
    for target, line in imports_of(path):
      if target not in MODULES:
        bad.append(f"{name}:{line} imports unknown module {target}")
        continue
      try:
        theirs = layer(target)
      except AssertionError:  # a facade package (lazy re-exports): importing it pulls nothing in
        theirs = TOP
      if theirs > mine:
        bad.append(f"patch_diffusion.{name} (layer {mine}) imports patch_diffusion.{target} (layer {theirs}) "
                   f"at line {line}")
  assert not bad, "\n".join(bad)


def test_no_import_cycle():
  graph = {name: {t for t, _ in imports_of(path) if t in MODULES and t != name} for name, path in MODULES.items()}
  state: dict[str, int] = {}

  def visit(node: str, trail: list[str]) -> None:
    state[node] = 1
    for nxt in graph[node]:
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
      if nxt not in state:
        visit(nxt, trail + [node])
    state[node] = 2

  for name in graph:
    if name not in state:
      visit(name, [])


@pytest.mark.parametrize("library,allowed", [
    ("orbax", {"checkpointing.orbax_io"}),
    ("tensorflow_datasets", {"data.datasets", "tools.prepare_dataset"}),
    ("grain", {"data.input_pipeline"}),
    ("tensorflow", set()),
    ("absl.flags", {"main", "data.input_pipeline"}),  # input_pipeline marks grain's flags parsed
])
def test_third_party_imports_stay_in_their_module(library, allowed):
  users = set()
  for name, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) else [])
      if any(n == library or n.startswith(library + ".") for n in names):
        users.add(name)
  assert users <= allowed, f"{library} imported by {sorted(users - allowed)}"


def test_functions_stay_short_outside_network_definitions():
  long = []
  for name, path in MODULES.items():
    if name.startswith("models.") or name == "evaluation.inception":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 80:
          long.append(f"patch_diffusion.{name}.{node.name}: {lines} lines")
  assert not long, "\n".join(long)
