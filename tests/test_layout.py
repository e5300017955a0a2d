"""The package's layout (docs/architecture.md, "Rooms and floors"): the rooms and their floors, the
one-way rule between them, and the deprecated old module paths.

FLOORS below is the one place the layering is written down. A module may import modules of its
own room and of any room on a lower floor: never a room on a higher floor, nor another room on
its own floor. Imports are read with `ast` from the source, module level and inside functions
alike (a lazy import is still an import), and no group of modules may import each other in a
circle. A new module must be given a room here.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("operators", "posterior_diff")

# The old module paths and where each one went (posterior_diff/_moved.py keeps a shim at each).
MOVED = {
    "posterior_diff.model_formats": "posterior_diff.models.formats",
    "posterior_diff.priors": "posterior_diff.models.priors",
    "posterior_diff.deepinv_prior": "posterior_diff.models.deepinv_prior",
    "posterior_diff.ffdnet_prior": "posterior_diff.models.ffdnet_prior",
    "posterior_diff.ladder": "posterior_diff.models.ladder",
    "posterior_diff.time_grids": "posterior_diff.sampling.time_grids",
    "posterior_diff.samplers": "posterior_diff.sampling.samplers",
    "posterior_diff.guidance": "posterior_diff.sampling.guidance",
    "posterior_diff.particles": "posterior_diff.sampling.particles",
    "posterior_diff.metrics": "posterior_diff.evaluation.metrics",
    "posterior_diff.problems": "posterior_diff.evaluation.problems",
    "posterior_diff.training_data": "posterior_diff.training.data",
    "posterior_diff.cli": "posterior_diff.apps.cli",
    "posterior_diff.command_options": "posterior_diff.apps.command_options",
    "posterior_diff.dataset": "posterior_diff.apps.dataset",
    "posterior_diff.pipeline": "posterior_diff.apps.pipeline",
}
# Old modules that became the package of their room: the package keeps their public names, unwarned.
BECAME_PACKAGES = {
    "posterior_diff.models": ("posterior_diff.models.loading", "posterior_diff.models.formats"),
    "posterior_diff.evaluation": ("posterior_diff.evaluation.harness",),
    "posterior_diff.training": ("posterior_diff.training.score_matching",),
}

# Lowest floor first; each floor maps its rooms to their modules. "pkg.*" is a package and every
# module under it; any other entry is one module.
FLOORS = [
    {"operators": ["operators", "operators.*"]},
    {"contracts": ["posterior_diff.checks", "posterior_diff.defaults", "posterior_diff.files", "posterior_diff.images",
                   "posterior_diff.schedules", "posterior_diff.tasks", "posterior_diff.version",
                   "posterior_diff.denoisers", "posterior_diff.deepinv_denoiser"]},
    {"models": ["posterior_diff.models", "posterior_diff.models.*"],
     "sampling": ["posterior_diff.sampling", "posterior_diff.sampling.*"]},
    {"restore": ["posterior_diff.restore", "posterior_diff.memory", "posterior_diff.noise_estimate",
                 "posterior_diff.start_estimates"]},
    {"evaluation": ["posterior_diff.evaluation", "posterior_diff.evaluation.*"]},
    {"training": ["posterior_diff.training", "posterior_diff.training.*"]},
    {"apps": ["posterior_diff.apps", "posterior_diff.apps.*"]},
    {"face": ["posterior_diff", "posterior_diff.__main__", "posterior_diff._moved", *MOVED]},
]


# -- reading the imports ----------------------------------------------------------------------------
def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Every module of the packages under root: dotted name -> file."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name` reads pkg; where name is a module of pkg it imports that module too.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def room_of(module: str, floors) -> tuple[int, str] | None:
    """(floor, room) of a module: the room with the longest entry that covers it."""
    best = None
    for level, rooms in enumerate(floors):
        for room, entries in rooms.items():
            for entry in entries:
                covers = (module == entry[:-2] or module.startswith(entry[:-1])) if entry.endswith(".*") else module == entry
                length = len(entry.rstrip(".*"))
                if covers and (best is None or length > best[0]):
                    best = (length, level, room)
    return None if best is None else best[1:]


def unplaced(graph, floors) -> list[str]:
    return sorted(module for module in graph if room_of(module, floors) is None)


def upward_imports(graph, floors) -> list[str]:
    """Imports of a higher floor, or of another room on the same floor, as 'a (room) -> b (room)'."""
    wrong = []
    for module, targets in sorted(graph.items()):
        level, room = room_of(module, floors)
        for target in sorted(targets):
            target_level, target_room = room_of(target, floors)
            if target_room != room and target_level >= level:
                wrong.append(f"{module} ({room}) -> {target} ({target_room})")
    return wrong


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -- the layering -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_every_module_has_a_room(graph):
    assert unplaced(graph, FLOORS) == []


def test_imports_run_one_way_down_the_floors(graph):
    assert upward_imports(graph, FLOORS) == []


def test_no_modules_import_each_other_in_a_circle(graph):
    assert cycles(graph) == []


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_sees_an_upward_import_a_sideways_one_and_a_circle(tmp_path):
    """The checks above on a small package of their own: each finds what it is for."""
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g  # lazy, still an import\n",
        "pkg/high.py": "from pkg import low\n",
        "pkg/left/__init__.py": "",
        "pkg/left/a.py": "from ..right.b import x\n",
        "pkg/right/__init__.py": "",
        "pkg/right/b.py": "import pkg.low\nx = 1\n",
    })
    floors = [{"low": ["pkg.low"]}, {"left": ["pkg.left.*"], "right": ["pkg.right.*"]},
              {"high": ["pkg", "pkg.high"]}]
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.left.a"] == {"pkg.right.b"} and graph["pkg.high"] == {"pkg", "pkg.low"}
    assert unplaced(graph, floors) == []
    assert upward_imports(graph, floors) == ["pkg.left.a (left) -> pkg.right.b (right)",
                                            "pkg.low (low) -> pkg.high (high)"]
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    assert unplaced(graph, floors[1:]) == ["pkg.low"]


# -- the old paths ----------------------------------------------------------------------------------
def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [name for name in vars(module) if not name.startswith("_")]


def test_every_old_path_has_its_shim():
    moved = importlib.import_module("posterior_diff._moved").MOVED
    assert moved == MOVED
    for old in MOVED:
        assert (ROOT / (old.replace(".", "/") + ".py")).is_file(), old


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_gives_the_new_objects(old):
    new = importlib.import_module(MOVED[old])
    module = importlib.import_module(old)
    names = public_names(new)
    assert names
    for name in names:
        with pytest.warns(DeprecationWarning, match=re.escape(MOVED[old])):
            value = getattr(module, name)
        assert value is getattr(new, name), name
    with pytest.warns(DeprecationWarning, match=re.escape(MOVED[old])):
        namespace = {}
        exec(f"from {old} import {names[0]} as taken", namespace)
    assert namespace["taken"] is getattr(new, names[0])
    assert set(names) <= set(dir(module))


@pytest.mark.parametrize("package", sorted(BECAME_PACKAGES))
def test_a_module_that_became_a_package_keeps_its_public_names_unwarned(package):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        face = importlib.import_module(package)
        sources = [importlib.import_module(name) for name in BECAME_PACKAGES[package]]
        for name in face.__all__:
            assert any(getattr(source, name, None) is getattr(face, name) for source in sources), name
    old_public = {"posterior_diff.models": ["DEFAULT_MODEL_DIR", "ModelLoadError", "UNetDenoiser", "load_model",
                                            "default_model", "denoiser_from_diffusers", "resolve_model_folder",
                                            "load_diffusers_components", "names_legacy_scheduler"],
                  "posterior_diff.evaluation": ["HELD_OUT", "psnr_ssim", "baselines", "measure", "load_photograph"],
                  "posterior_diff.training": ["TrainingConfig", "train", "TrainingRun", "load_checkpoint"]}
    assert set(old_public[package]) <= set(face.__all__)


def test_the_package_names_stay_what_they_were():
    """An old module path that is also a public name (posterior_diff.ladder) keeps the name's object."""
    import posterior_diff

    ladder_module = importlib.import_module("posterior_diff.models.ladder")

    with pytest.warns(DeprecationWarning):
        from posterior_diff.ladder import Ladder  # noqa: F401
    assert posterior_diff.ladder is ladder_module.ladder
    for name in posterior_diff.__all__:
        assert getattr(posterior_diff, name) is not None, name


def test_the_console_script_and_python_dash_m_reach_the_command():
    entry = re.search(r'^posterior-diff = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    module, _, function = entry.partition(":")
    assert module == "posterior_diff.apps.cli"
    assert callable(getattr(importlib.import_module(module), function))
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m", "posterior_diff", "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "restore" in result.stdout, result.stderr


def test_the_pipeline_imports_absolute_names_only():
    """diffusers loads apps/pipeline.py by its file path (custom_pipeline=), outside the package."""
    for path in (ROOT / "posterior_diff/apps/pipeline.py", ROOT / "posterior_diff/pipeline.py"):
        tree = ast.parse(path.read_text())
        assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)), path
