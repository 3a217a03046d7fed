"""The library (ops, reference, rope, nn, models, orders, tokenizers, info) stands without
the application in ``sarkernels.app``: none of its modules imports from there, even lazily."""
import ast
import pathlib

import sarkernels

PACKAGE = pathlib.Path(sarkernels.__file__).parent


def imported_modules(path):
    """Absolute names of every module ``path`` imports, at any depth of its code."""
    package = ".".join(("sarkernels",) + path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_library_never_imports_the_application():
    library = [p for p in PACKAGE.rglob("*.py")
               if p.relative_to(PACKAGE).parts[0] not in ("app", "__main__.py")]
    assert len(library) >= 15, library  # the walk found the package
    offenders = {str(p.relative_to(PACKAGE)): m for p in library for m in imported_modules(p)
                 if m == "sarkernels.app" or m.startswith("sarkernels.app.")}
    assert not offenders


def test_the_resolver_sees_an_application_import():
    # the check above would pass vacuously if relative imports resolved wrongly
    names = set(imported_modules(PACKAGE / "__main__.py"))
    assert "sarkernels.app.cli" in names
    assert "sarkernels.app.data" in set(imported_modules(PACKAGE / "app" / "tokenize.py"))
