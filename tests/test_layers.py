"""Which part of trionbd may import which (docs/architecture.md, "Rules"): every import of
every module, read from its syntax tree (also those under ``if TYPE_CHECKING``), is
checked against the rules below; a test fails naming each import that runs the wrong
way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trionbd"

RULES = [  # (modules under, may not import, why)
    ("protocol", "trio", "protocol/ is sans-IO"),
    ("protocol", "trionbd.server", "protocol/ is below the server"),
    ("formats", "trio", "formats/ are pure parsers"),
    ("formats", "trionbd.server", "formats/ are pure parsers"),
    ("formats", "trionbd.chain", "formats/ are pure parsers"),
    ("chain", "trionbd.server", "the chain never reaches into the server"),
    ("chain", "trionbd.cli", "the chain never imports the command line"),
    ("chain", "trionbd.plugins", "the chain never imports plugins (registry.py finds them)"),
    ("chain", "trionbd.filters", "the chain never imports filters (registry.py finds them)"),
    ("plugins", "trionbd.server", "plugins never reach into the server"),
    ("plugins", "trionbd.cli", "plugins never import the command line"),
    ("filters", "trionbd.server", "filters never reach into the server"),
    ("filters", "trionbd.cli", "filters never import the command line"),
    ("filters", "trionbd.plugins", "filters do not borrow from plugins"),
    ("client", "trionbd.server", "the client (used by the nbd plugin) is not the server"),
    ("net", "trionbd.server", "net/ is what the server and the client share"),
    ("net", "trionbd.chain", "net/ is below the chain: bytes and addresses only"),
    ("osutil.py", "trionbd", "OS helpers are neutral ground: any layer may use them"),
]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved, with each imported name
    also as ``module.name`` (``from ..server import x`` gives ``trionbd.server.x``)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return out


def violations(under: str, forbidden: str) -> list[str]:
    root = PACKAGE / under
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    assert files and all(f.is_file() for f in files), f"nothing to check under {root}"
    return [
        f"{f.relative_to(PACKAGE.parent)} imports {name}"
        for f in files
        for name in sorted(imports(f))
        if name == forbidden or name.startswith(forbidden + ".")
    ]


@pytest.mark.parametrize(
    ("under", "forbidden", "why"), RULES, ids=[f"{u} !-> {f}" for u, f, _ in RULES]
)
def test_no_import_runs_the_wrong_way(under: str, forbidden: str, why: str) -> None:
    bad = violations(under, forbidden)
    assert not bad, f"{why}: " + "; ".join(bad)


def test_the_check_sees_imports_of_every_form() -> None:
    """The checker itself: absolute, relative and ``from`` imports are all seen."""
    module = PACKAGE / "filters" / "tar.py"
    found = imports(module)
    assert "trio" in found and "trionbd.chain" in found and "trionbd.formats.tar" in found
    assert "trionbd.filters._formats.Piece" in found
