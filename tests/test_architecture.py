"""The package's layering: every guidelab module imports only modules below it in one order, so there is no import
cycle and no import from a lower module up to a higher one. A new module must take its place in ORDER."""

import ast
from pathlib import Path

import guidelab

PACKAGE = Path(guidelab.__file__).parent
ORDER = [
    "errors",
    "files",
    "registry",
    "conditions",
    "morpho",
    "pretrained",
    "diffusion",
    "schedules",
    "losses",
    "dist",
    "images",
    "log",
    "checkpoint",
    "rundir",
    "shards",
    "folder",
    "data",
    "augment",
    "models",
    "guided",
    "guidance",
    "sampling",
    "metrics",
    "knn",
    "networks",
    "drawing",
    "results",
    "train",
    "report",
    "config",
    "cli",
]


def _unit(module: str) -> str:
    """guidelab.models.unet -> models (a subpackage is one unit; imports inside it are its own business)."""
    return module.split(".")[1] if module.count(".") else module


def test_every_module_imports_only_modules_below_it():
    units = {p.stem if p.parent == PACKAGE else p.parent.name for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set(ORDER), f"place new modules in ORDER: {sorted(units ^ set(ORDER))}"
    for path in PACKAGE.rglob("*.py"):
        me = path.stem if path.parent == PACKAGE else path.parent.name
        if me == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if isinstance(node, ast.ImportFrom) and node.module == "guidelab":
                names = [f"guidelab.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("guidelab.") and _unit(name) != me:
                    assert ORDER.index(_unit(name)) < ORDER.index(me), f"{path.name} imports {name}"


def test_no_module_over_400_lines_and_no_function_over_60():
    """The package stays readable in one sitting per file: modules of at most 400 lines, functions of at most 60 (the
    entry scripts too), and sample.py, the script users read first, at most 150 lines."""
    files = [
        *PACKAGE.rglob("*.py"),
        *(
            PACKAGE.parents[1] / name
            for name in ("sample.py", "train_diffusion.py", "train_classifier.py", "export_diffusers.py")
        ),
    ]
    for path in files:
        text = path.read_text()
        assert len(text.splitlines()) <= (150 if path.name == "sample.py" else 400), path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"


def test_the_slowest_first_order_names_real_files_once():
    """conftest.SLOWEST_FILES orders `make test`'s files: a name that is no test file (a renamed one) would silently
    fall back to collection order."""
    from conftest import REPO, SLOWEST_FILES

    assert len(set(SLOWEST_FILES)) == len(SLOWEST_FILES)
    for name in SLOWEST_FILES:
        assert (REPO / "tests" / name).is_file(), name
