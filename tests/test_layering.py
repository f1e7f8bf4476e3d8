"""The package keeps the plan of ARCHITECTURE.md: which part may import which, and no private imports.

Parts: ``errors``, ``interface`` and ``metrics`` stand alone; ``file`` (the file table) uses only
them; ``compute`` and ``train`` build on ``file``; ``testing`` on file and compute; ``cli`` on
everything. No module
imports a private (``_name``) object from another module, and no module is longer than about
600 lines.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import embkv

PACKAGE = Path(embkv.__file__).parent

# part -> the parts it may import (itself always); a part is the first name below embkv
ALLOWED = {
    "errors": set(),
    "interface": set(),
    "metrics": set(),
    "file": {"errors", "interface"},
    "compute": {"errors", "interface", "metrics", "file"},
    "train": {"errors", "interface", "file"},
    "torch": {"errors", "interface", "file", "train"},
    "testing": {"errors", "interface", "metrics", "file", "compute"},
    "cli": {"errors", "interface", "metrics", "file", "compute", "train", "testing", "__init__"},
    "__init__": {"errors", "interface", "metrics", "file", "compute"},
}
MAX_LINES = 650


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_vendor" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(name: str) -> str:
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module imported, names taken from it, line) for every embkv import in ``path``."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "embkv" or target.startswith("embkv."):
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("embkv")]
    return found


def test_the_package_has_the_parts_the_rules_name():
    assert {part_of(module_name(p)) for p in modules()} == set(ALLOWED)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_part_imports_only_what_it_may(path):
    here = module_name(path)
    mine = part_of(here)
    for target, names, line in imports(path):
        theirs = part_of(target)
        if target == "embkv":  # `import embkv` / `from embkv import x`: the public API
            theirs = "__init__"
            if names and all(n in ALLOWED.get(mine, set()) | {mine} for n in names):
                continue  # `from embkv import file` names a part, not the API
        assert theirs == mine or theirs in ALLOWED[mine], (
            f"{here}:{line} imports {target} ({mine} may not use {theirs})")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_private_names_of_another(path):
    for target, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module_name(path)}:{line} imports private {private} from {target}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by concept"


def test_architecture_md_lists_every_module():
    text = (PACKAGE.parent.parent / "ARCHITECTURE.md").read_text()
    missing = []
    for path in modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.endswith("__main__.py") or (rel.endswith("__init__.py") and rel != "__init__.py"
                                            and rel != "cli/__init__.py"):
            continue
        if f"`{rel}`" not in text and f"`{os.path.dirname(rel)}/`" not in text:
            missing.append(rel)
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
