"""Imports point one way: labels -> config -> models -> checkpoint -> commands -> cli.

Each module of the package has a layer; a module may import from a lower layer, or from its
own sub-package (``agcnn.data.datasets`` from ``agcnn.data.cache``), never from a higher one --
whether at the top of the file or inside a function. A model can then be built, tested and
benchmarked without the training or inference code, and no import circle can come back.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agcnn"

# Module (or sub-package) -> layer. The longest matching prefix decides.
LAYERS = {
    "agcnn.errors": 0,  # imports nothing from agcnn: every module may raise its errors
    "agcnn.labels": 1,
    "agcnn.fileio": 1,
    "agcnn.argtypes": 1,  # argparse number types the commands share
    "agcnn.libmessages": 1,  # the DICOM libraries' messages counted, not shown; standard library only
    "agcnn.metrics": 1,
    "agcnn": 2,  # the package itself: __version__, and the label list re-exported (any module may import it)
    "agcnn.config": 2,
    "agcnn.calibration": 2,  # the calibration math (imports metrics)
    "agcnn.stages": 3,
    "agcnn.runtime": 3,
    "agcnn.precision": 3,
    "agcnn.data": 3,
    "agcnn.drift": 3,  # the site check (imports calibration)
    "agcnn.overlays": 3,
    "agcnn.models": 4,
    "agcnn.dicom_out": 4,  # reads the scope tables of agcnn.data (which body parts are unpaired)
    "agcnn.report": 4,  # renders what evaluate computed
    "agcnn.checkpoint": 5,
    "agcnn.explain": 5,  # maps of a model; no checkpoint or command code
    "agcnn.calibration_report": 5,  # renders what evaluate computed on calibration
    "agcnn.card": 5.5,  # a checkpoint's model card; above checkpoint, below the pages that show it
    "agcnn.inference": 6,  # checkpoint -> model for inference, and scoring at its precision
    "agcnn.pages": 6.5,  # the HTML reports: redraw a few cases through inference; evaluate, localize, demo write them
    "agcnn.data.prepare": 7,  # `agcnn prepare`
    "agcnn.train": 7,
    "agcnn.evaluate": 7,
    "agcnn.predict": 7,
    "agcnn.localize": 7,  # `agcnn localize`
    "agcnn.demo": 8,  # runs train, evaluate and predict
    "agcnn.calibrate": 8,  # `agcnn calibrate`: scores its data with evaluate
    "agcnn.dicomnet": 8,  # `agcnn send` and `agcnn serve`, which runs predict
    "agcnn.cli": 9,
    "agcnn.__main__": 10,
}


def layer(module: str) -> tuple[int, str]:
    """(layer, the LAYERS key that gave it) for a dotted module name."""
    parts = module.split(".")
    for n in range(len(parts), 1 if len(parts) > 1 else 0, -1):  # the root "agcnn" matches only itself
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key], key
    raise KeyError(f"{module} has no layer in tests/test_layers.py::LAYERS; add it")


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def agcnn_imports(module: str) -> set[str]:
    """Every agcnn module ``module`` imports, at any depth of its code."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "agcnn")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "agcnn" and not node.level:
            # ``from agcnn.data import readers`` imports agcnn.data.readers.
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else node.module)
    return found


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


@pytest.mark.parametrize("module", modules())
def test_imports_point_down(module):
    mine, key = layer(module)
    for imported in agcnn_imports(module):
        theirs, their_key = layer(imported)
        same_package = key == their_key and key != "agcnn"
        assert theirs < mine or same_package or imported == "agcnn", (
            f"{module} (layer {mine}) imports {imported} (layer {theirs}); imports must point to lower layers"
        )


def test_importing_the_models_imports_neither_checkpoints_nor_commands():
    code = "import sys, agcnn.models; print(' '.join(sorted(m for m in sys.modules if m.startswith('agcnn'))))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "agcnn.models.agcnn" in loaded  # the probe itself works
    assert not loaded & {"agcnn.checkpoint", "agcnn.train", "agcnn.evaluate", "agcnn.predict", "agcnn.cli"}, loaded


@pytest.mark.parametrize("module", modules())
def test_no_private_name_is_imported_from_another_module(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agcnn"):
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            assert not private, f"{module} imports {private} from {node.module}; make them public or keep them there"


# ---------------------------------------------------------------------- rooms that cannot grow back

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_DRIVER_LINES = 60
# The functions that run a command from start to end: each reads as a short list of named steps.
DRIVERS = {
    "agcnn.cli": ("main",),
    "agcnn.evaluate": ("run", "evaluate"),
    "agcnn.localize": ("run", "localize"),
    "agcnn.predict.command": ("run",),
    "agcnn.predict.run": ("predict", "_run", "run_batches"),
    "agcnn.predict.merge": ("run", "merge_shards"),
    "agcnn.demo": ("run", "run_demo"),
    "agcnn.data.prepare": ("run",),
    "agcnn.data.synthetic": ("run",),
    "agcnn.train.command": ("run",),
    "agcnn.train.loop": ("train", "run_stage", "train_epoch"),
    "agcnn.train.stage": ("build_stage",),
}
# Longer on purpose, each with its reason. A module name stands for the module's length and
# every function in it; "module.function" for that function alone.
SIZE_ALLOWED = {
    "agcnn.data.readers": "the DICOM reader: one decision per DICOM rule (photometric, VOI, frames, "
                          "scope), each with its error message; split, the rules lose their order",
    "agcnn.data.synthetic.make_phantom": "the phantom painter: one anatomical layer after another, in the order "
                                         "they are drawn",
}


def _functions(tree: ast.AST):
    """(qualified name, node) of every function, methods and nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def _path(module: str) -> Path:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    return path if path.exists() else PACKAGE.parent / module.replace(".", "/") / "__init__.py"


def _allowed(module: str, function: str | None = None) -> bool:
    return any(key in SIZE_ALLOWED for key in (module, *(m for m in [f"{module}.{function}"] if function)))


def test_the_size_allow_list_names_what_exists():
    for key in SIZE_ALLOWED:
        module, _, function = key.rpartition(".")
        if key in modules():
            continue
        assert module in modules() and function in dict(_functions(ast.parse(_path(module).read_text()))), (
            f"SIZE_ALLOWED names {key}, which no longer exists; remove it from the list")


@pytest.mark.parametrize("module", modules())
def test_no_module_or_function_grows_past_its_size(module):
    source = _path(module).read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES or _allowed(module), (
        f"{module} has {lines} lines (at most {MAX_MODULE_LINES}); split it by concern")
    drivers = DRIVERS.get(module, ())
    for name, node in _functions(ast.parse(source)):
        n = node.end_lineno - node.lineno + 1
        limit = MAX_DRIVER_LINES if name in drivers else MAX_FUNCTION_LINES
        assert n <= limit or _allowed(module, name), (
            f"{module}.{name} has {n} lines (at most {limit}{', a driver' if name in drivers else ''}); "
            f"give its steps names of their own")


# One home for each concept: (what, the calls that do it, the modules allowed to make them).
SINGLE_HOMES = [
    ("a checkpoint rebuilt into a model for inference", ("model_from_checkpoint",),
     {"agcnn.checkpoint", "agcnn.inference"}),
    ("a model scored at an inference precision", ("inference_precision",),
     # agcnn.train.sources: validation of the cached stages scores pool5 features and crops, which
     # no image pass gives; images are scored through agcnn.inference.score.
     {"agcnn.precision", "agcnn.inference", "agcnn.train.sources"}),
    ("the evaluation transform's geometry", ("scaled_resize", "centre_offset"), {"agcnn.data.geometry"}),
]


@pytest.mark.parametrize("what,calls,homes", SINGLE_HOMES, ids=[h[0] for h in SINGLE_HOMES])
def test_each_concept_has_one_home(what, calls, homes):
    offenders = []
    for module in modules():
        if module in homes:
            continue
        for node in ast.walk(ast.parse(_path(module).read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in calls:
                    offenders.append(f"{module}:{node.lineno} {name}")
    assert not offenders, f"{what} lives in {sorted(homes)}; also done in {offenders}"


def test_the_crop_offset_is_computed_in_one_place():
    # The centre crop's offset, written out by hand (round((first - side) / 2), (first - side) // 2).
    pattern = re.compile(r"\(\s*\w*first\w*\s*-\s*[\w.]+\s*\)\s*(//|/)\s*2")
    offenders = [f"{m}:{i}" for m in modules() if m != "agcnn.data.geometry"
                 for i, line in enumerate(_path(m).read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"use agcnn.data.geometry.Geometry for the crop offset: {offenders}"


def _bound_names(module: str) -> set[str]:
    """Names ``module`` defines itself (not those it imports from another agcnn module)."""
    names: set[str] = set()
    for node in ast.parse(_path(module).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("agcnn"):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and _path(module).name == "__init__.py" and node.module.startswith(module + "."):
            names.update(a.asname or a.name for a in node.names)  # a package presents its own modules' names
        elif isinstance(node, (ast.If, ast.Try)):
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    return names


@pytest.mark.parametrize("module", modules())
def test_names_are_imported_from_their_home(module):
    known = set(modules())
    for node in ast.walk(ast.parse(_path(module).read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agcnn") and not node.level):
            continue
        if node.module not in known:
            continue
        home = _bound_names(node.module)
        for a in node.names:
            if f"{node.module}.{a.name}" in known or a.name == "__version__":
                continue  # a submodule
            assert a.name in home, (
                f"{module} imports {a.name} from {node.module}, which only passes it on; import it from where it is "
                f"defined")
