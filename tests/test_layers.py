"""The package's layers, as README's Development section draws them: imports only run down (or sideways within a
layer), and only the command line and the demo use click or the dataset converters."""
from __future__ import annotations

import ast
from pathlib import Path

import nnxai

PACKAGE = Path(nnxai.__file__).parent
LAYERS = (
    ("nnxai", "nnxai.errors", "nnxai.files"),
    ("nnxai.nnunet",),
    ("nnxai.attribution", "nnxai.lesions"),
    ("nnxai.explain",),
    ("nnxai.experiments", "nnxai.sanity", "nnxai.analysis"),
    ("nnxai.cli", "nnxai.demo"),
)
TOP = len(LAYERS) - 1
APPLICATION_ONLY = ("click", "dataset_conversion")


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names `module` or a package above it."""
    matches = [(len(prefix), number) for number, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def module_imports() -> dict[str, set[str]]:
    """Every module of nnxai (the vendored viewer aside) and what it imports, at the top or inside functions."""
    imports = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "vendor" in path.parts:
            continue
        name = ".".join(("nnxai", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
        imports[name] = found
    return imports


def test_every_module_belongs_to_a_layer():
    modules = module_imports()
    assert len(modules) > 40 and all(isinstance(layer_of(module), int) for module in modules)


def test_imports_run_down_the_layers():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in module_imports().items() for target in targets
              if target.split(".")[0] == "nnxai" and layer_of(target) > layer_of(module)]
    assert upward == []


def test_only_the_application_layer_uses_click_and_the_converters():
    misplaced = [f"{module} imports {target}" for module, targets in module_imports().items() for target in targets
                 if target.split(".")[0] in APPLICATION_ONLY and layer_of(module) < TOP]
    assert misplaced == []
