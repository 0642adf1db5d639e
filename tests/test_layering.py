"""The package's layering as docs/architecture.md lays it out: every module in one layer, imports only from the same or
a lower layer (top-level, function-level and TYPE_CHECKING imports alike), no import cycle, and every name imported
from (and named by) the module that defines it, in the package, tests, examples, benchmarks and the docs (only the
package ``cusa_hf`` re-exports, its ``__all__``). Reads source files; imports nothing of the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cusa_hf"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def top_level_names(path: Path) -> set[str]:
    """The names a module defines itself (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name))
    return names


DEFINED = {name: top_level_names(path) for name, path in MODULES.items()}
PUBLIC = set(
    ast.literal_eval(
        next(
            node.value
            for node in ast.parse((PACKAGE / "__init__.py").read_text()).body
            if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets)
        )
    )
)


def resolve(node: ast.ImportFrom, importer: str | None) -> str:
    """The absolute module an ``ImportFrom`` names (``importer``: the importing module, for relative imports)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(node, name)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("cusa_hf") and target != name:
                found.add(target)
    return found


def layers() -> dict[str, tuple[int, str]]:
    """``{module: (layer number, layer name)}`` from the ``layers`` block of docs/architecture.md."""
    block = re.search(r"```layers\n(.*?)```", ARCHITECTURE.read_text(), flags=re.S).group(1)
    assigned: dict[str, tuple[int, str]] = {}
    for line in block.strip().splitlines():
        number, rest = line.split(" ", 1)
        layer, entries = rest.split(":", 1)
        for entry in entries.split():
            dotted = ".".join(["cusa_hf", *entry.rstrip("/").split("/")]).removesuffix(".__init__")
            if entry.endswith("/"):  # the package and every module in it
                matched = [name for name in MODULES if name == dotted or name.startswith(dotted + ".")]
            else:
                matched = [dotted]
            for name in matched:
                assert name in MODULES, f"docs/architecture.md lists {entry!r}, which is no module of cusa_hf"
                assert name not in assigned, f"docs/architecture.md puts {name} in two layers"
                assigned[name] = (int(number), layer)
    return assigned


def test_every_module_imports_only_from_its_layer_or_below():
    layer_of = layers()
    assert not set(MODULES) - set(layer_of), f"modules in no layer of docs/architecture.md: {sorted(set(MODULES) - set(layer_of))}"
    upward = [
        f"{name} (layer {layer_of[name][0]} {layer_of[name][1]}) imports {target} (layer {layer_of[target][0]} "
        f"{layer_of[target][1]})"
        for name in MODULES
        for target in imported_modules(name)
        if layer_of[target][0] > layer_of[name][0]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {name: imported_modules(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def python_sources() -> dict[str, str]:
    """``{where: code}``: the package, tests, examples and benchmarks, and the Python in the docs and README."""
    sources = {str(path.relative_to(REPO)): path.read_text() for folder in ("cusa_hf", "tests", "examples", "benchmarks")
               for path in sorted((REPO / folder).rglob("*.py"))}  # fmt: skip
    for path in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        text = path.read_text()
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            sources[f"{path.relative_to(REPO)} (code block {number + 1})"] = block
        for number, line in enumerate(re.findall(r"(from cusa_hf[\w.]* import [\w, ]+)", text)):
            sources[f"{path.relative_to(REPO)} (import {number + 1})"] = line
    return sources


def test_every_name_is_imported_from_its_home():
    misplaced = []
    for where, code in python_sources().items():
        importer = module_name(REPO / where) if where.startswith("cusa_hf/") else None
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue  # prose or an elided snippet, not code to check
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = resolve(node, importer)
            if not source.startswith("cusa_hf") or source not in MODULES:
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES or alias.name in DEFINED[source]:
                    continue
                if source == "cusa_hf" and alias.name in PUBLIC and importer is None:
                    continue  # the public API, for users of the package (the package itself imports from homes)
                homes = [name for name, names in DEFINED.items() if alias.name in names and name != "cusa_hf"]
                misplaced.append(f"{where}:{node.lineno}: {alias.name} from {source} (defined in {', '.join(homes) or '?'})")
    assert not misplaced, "\n".join(misplaced)


def test_docs_and_docstrings_name_each_name_by_its_home():
    """Dotted references such as ``cusa_hf.teachers.features.add_teacher_features`` in the docs, README and the
    package's docstrings and messages name the module that defines the name."""
    misplaced = []
    paths = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md", *sorted(PACKAGE.rglob("*.py"))]
    for path in paths:
        text = path.read_text()
        for match in re.finditer(r"cusa_hf(?:\.[A-Za-z_]\w*)+", text):
            parts = match.group(0).split(".")
            depth = max(length for length in range(1, len(parts) + 1) if ".".join(parts[:length]) in MODULES)
            module, rest = ".".join(parts[:depth]), parts[depth:]
            if not rest or rest[0] in DEFINED[module] or (module == "cusa_hf" and rest[0] in PUBLIC):
                continue
            line = text[: match.start()].count("\n") + 1
            misplaced.append(f"{path.relative_to(REPO)}:{line}: {match.group(0)}")
    assert not misplaced, "\n".join(misplaced)
