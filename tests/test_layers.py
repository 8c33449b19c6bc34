"""Imports point one way: labels -> config -> models -> checkpoint -> commands -> cli.

Each module of the package has a layer; a module may import from a lower layer, or from its
own sub-package (``agcnn.data.datasets`` from ``agcnn.data.cache``), never from a higher one --
whether at the top of the file or inside a function. A model can then be built, tested and
benchmarked without the training or inference code, and no import circle can come back.
"""

from __future__ import annotations

import ast
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
    "agcnn.metrics": 1,
    "agcnn": 2,  # the package itself: __version__, and the label list re-exported (any module may import it)
    "agcnn.config": 2,
    "agcnn.stages": 3,
    "agcnn.runtime": 3,
    "agcnn.precision": 3,
    "agcnn.data": 3,
    "agcnn.overlays": 3,
    "agcnn.dicom_out": 3,
    "agcnn.models": 4,
    "agcnn.report": 4,  # renders what evaluate computed
    "agcnn.checkpoint": 5,
    "agcnn.explain": 5,  # maps of a model; no checkpoint or command code
    "agcnn.card": 5.2,  # a checkpoint's model card; above checkpoint, below the pages that show it
    "agcnn.pages": 5.5,  # the HTML reports: redraw a few cases from checkpoint and explain; evaluate, localize, demo write them
    "agcnn.data.prepare": 6,  # `agcnn prepare`
    "agcnn.train": 6,
    "agcnn.evaluate": 6,
    "agcnn.predict": 6,
    "agcnn.localize": 6,  # `agcnn localize`
    "agcnn.demo": 7,  # runs train, evaluate and predict
    "agcnn.cli": 8,
    "agcnn.__main__": 9,
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
