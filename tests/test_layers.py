"""The import arrows of DESIGN.md, checked by parsing every module of the package.

daemon -> protocols, backends;  protocols -> backends' model/outcomes/errors only;  backends -> neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("daemon", "protocols", "backends")
# What protocols/ may use of backends/: the model, the outcomes and the errors, never an implementation.
PROTOCOLS_MAY_IMPORT = {
    "mailroster.backends.model",
    "mailroster.backends.outcome",
    "mailroster.backends.errors",
    "mailroster.backends.tasks",  # the eager runner's contract with backends that need a task
}


def imports_of(path: Path, layer: str) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved inside ``layer``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = [f"mailroster.{layer}", *path.relative_to(ROOT / layer).parent.parts]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                if node.module is None:
                    found.update(f"{module}.{alias.name}" for alias in node.names)
                else:
                    found.add(module)
            elif node.module:
                found.add(node.module)
    return found


def modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", modules("backends"), ids=lambda p: p.name)
def test_backends_import_neither_protocols_nor_daemon(path: Path) -> None:
    bad = {m for m in imports_of(path, "backends") if m.startswith(("mailroster.protocols", "mailroster.daemon"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("protocols"), ids=lambda p: p.name)
def test_protocols_use_only_the_model_of_backends(path: Path) -> None:
    found = imports_of(path, "protocols")
    bad = {m for m in found if m.startswith("mailroster.daemon")}
    bad |= {m for m in found if m.startswith("mailroster.backends") and m not in PROTOCOLS_MAY_IMPORT}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    """The test above would pass vacuously if imports_of missed imports: show it finds both forms."""
    found = imports_of(ROOT / "daemon" / "lookups.py", "daemon")
    assert "mailroster.backends.directory" in found
    assert "mailroster.daemon.config" in found


def test_every_layer_has_modules() -> None:
    for layer in LAYERS:
        assert (ROOT / layer / "__init__.py").exists()
        assert len(modules(layer)) > 1
