"""The package tree shows the architecture: core -> one folder per framework -> callbacks.

Checked on the source (imports read with ``ast``), so a new module that crosses a
layer fails here rather than in a user's environment without that framework.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "energy_callbacks"
FRAMEWORKS = {"torch", "lightning", "keras", "tensorflow", "jax", "transformers"}


def imported(path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module or "")
    return names


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def test_one_folder_per_framework_and_no_adapter_module_at_the_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert [n for n in root if n.startswith(("torch", "keras"))] == []
    assert not (PACKAGE / "backends").exists()
    assert {p.name for p in modules("torch")} >= {"__init__.py", "attached.py", "ops.py"}
    assert {p.name for p in modules("keras")} >= {"__init__.py", "callback.py", "ops.py"}


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: p.name)
def test_core_imports_no_framework_and_no_adapter(path):
    names = imported(path)
    assert roots(names) & FRAMEWORKS == set()
    assert {n for n in names if n.startswith("energy_callbacks.")} <= {
        n for n in names if n.startswith("energy_callbacks.core")
    }


@pytest.mark.parametrize("path", modules("torch"), ids=lambda p: p.name)
def test_the_torch_folder_imports_torch_and_core_only(path):
    names = imported(path)
    assert roots(names) & FRAMEWORKS <= {"torch"}, path.name
    ours = {n for n in names if n.startswith("energy_callbacks")}
    assert all(n.startswith(("energy_callbacks.core", "energy_callbacks.torch")) for n in ours)


@pytest.mark.parametrize("path", modules("keras"), ids=lambda p: p.name)
def test_the_keras_folder_imports_keras_and_core_only(path):
    names = imported(path)
    # tensorflow/jax/torch only where a backend needs its own call, never the torch adapter
    ours = {n for n in names if n.startswith("energy_callbacks")}
    assert all(n.startswith(("energy_callbacks.core", "energy_callbacks.keras")) for n in ours)
    assert "lightning" not in roots(names)


def test_the_lightning_callback_is_a_layer_over_the_torch_folder():
    ours = {n for n in imported(PACKAGE / "lightning.py") if n.startswith("energy_callbacks")}
    assert any(n.startswith("energy_callbacks.torch") for n in ours)
    assert all(n.startswith(("energy_callbacks.core", "energy_callbacks.torch")) for n in ours)


def test_the_trainer_callback_is_a_layer_over_the_torch_folder():
    names = imported(PACKAGE / "transformers.py")
    ours = {n for n in names if n.startswith("energy_callbacks")}
    assert any(n.startswith("energy_callbacks.torch") for n in ours)
    assert all(n.startswith(("energy_callbacks.core", "energy_callbacks.torch")) for n in ours)
    assert roots(names) & FRAMEWORKS <= {"torch", "transformers"}
