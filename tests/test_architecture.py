"""Module boundaries of ``securefed``: no import cycle, and no private name crosses a package line.

Every module is parsed with ``ast`` (never imported). An import inside a function counts like one
at module level, since its only use in this code base would be dodging a cycle; an import under
``if TYPE_CHECKING:`` counts for the private-name rule but not for cycles (it never runs).

A name is private when it starts with ``_`` (dunders excepted); a module is private when a
component of its dotted path is. A private name is its module's own: no other module imports it
or reaches it as ``alias._name``. Modules of one package may use that package's private modules
(``securefed.flower.strategy`` may import ``securefed.flower._checkpoint``); a module in any other
package, parent and child packages included, may not.

Sizes: no class over 300 lines and no function over 100 (issue 22), counted from the ``def`` or
``class`` line to the last line of the body, docstrings and comments included.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "securefed"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclasses.dataclass(frozen=True)
class Use:
    """One imported thing: ``target`` (a module), and ``name`` when a non-module name of it is taken."""

    importer: Module
    line: int
    target: str
    name: str | None
    runtime: bool


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Module]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def uses(module: Module, known: dict[str, Module]) -> list[Use]:
    """Every securefed module or name that ``module`` imports, or reaches as ``alias._name``."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    skip = _type_checking_lines(tree)
    found: list[Use] = []
    aliases: dict[str, str] = {}  # local name -> securefed module it is bound to
    for node in ast.walk(tree):
        runtime = node.lineno not in skip if isinstance(node, ast.stmt) else True
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known or alias.name.startswith(PACKAGE + "."):
                    found.append(Use(module, node.lineno, alias.name, None, runtime))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append(Use(module, node.lineno, sub, None, runtime))
                    aliases[alias.asname or alias.name] = sub
                else:
                    found.append(Use(module, node.lineno, base, alias.name, runtime))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _is_private(node.attr)):
            found.append(Use(module, node.lineno, aliases[node.value.id], node.attr, False))
    return found


def private_crossings(known: dict[str, Module], root: Path = ROOT) -> list[str]:
    """``file:line: what`` for each private name used outside its module, or private module used outside
    its package."""
    bad = []
    for module in known.values():
        for use in uses(module, known):
            parts = use.target.split(".")
            owner, user = None, module.package  # who may use this private thing, and who does
            if use.name is not None and _is_private(use.name):
                owner, user = use.target, module.name  # a private name: its own module only
            else:
                for i, part in enumerate(parts):
                    if _is_private(part):  # a private module: its package
                        owner = ".".join(parts[:i])
                        break
            if owner is not None and owner != user:
                what = use.target + (f".{use.name}" if use.name else "")
                bad.append(f"{module.path.relative_to(root).as_posix()}:{use.line}: {what} (private to {owner})")
    return sorted(bad)


def import_graph(known: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module in known.values():
        for use in uses(module, known):
            if use.runtime and use.target in known and use.target != module.name:
                graph[module.name].add(use.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycle():
    graph = import_graph(modules())
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])


def oversized(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """``file:line: kind name (N lines)`` for each class over 300 lines and function over 100."""
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            limit = 300 if isinstance(node, ast.ClassDef) else 100
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > limit:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    bad.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {kind} {node.name} ({size} lines)")
    return bad


def test_no_class_over_300_lines_and_no_function_over_100():
    assert oversized() == []


def test_the_size_check_counts_lines(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(99))  # f: 100 lines, at the limit
    (pkg / "m.py").write_text("class Big:\n    def f(self):\n" + body + "    y = 1\n" * 200)
    assert oversized(tmp_path) == ["securefed/m.py:1: class Big (301 lines)"]
    (pkg / "m.py").write_text("def g():\n" + body.replace("        ", "    ") + "    return 1\n")
    assert oversized(tmp_path) == ["securefed/m.py:1: function g (101 lines)"]


def test_no_private_name_crosses_a_module():
    assert private_crossings(modules()) == []


def test_the_checks_see_imports(tmp_path):
    # The two checks run on a small package with one cycle and six crossings, so an empty answer
    # above means that securefed has none rather than that the parser saw nothing.
    pkg = tmp_path / PACKAGE
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_hidden.py").write_text("from securefed.inner import a\n_X = 1\n")
    (pkg / "inner" / "__init__.py").write_text("")
    (pkg / "inner" / "a.py").write_text("def f():\n    from securefed import _hidden\n")
    (pkg / "inner" / "b.py").write_text("from securefed.inner import a\nfrom ._c import _y\nfrom .a import _z\n"
                                        "print(a._w)\n")
    (pkg / "inner" / "_c.py").write_text("from .. import _hidden\nprint(_hidden._X)\n")
    known = modules(tmp_path)
    assert find_cycle(import_graph(known)) == ["securefed._hidden", "securefed.inner.a", "securefed._hidden"]
    crossings = private_crossings(known, tmp_path)
    assert crossings == [
        "securefed/inner/_c.py:1: securefed._hidden (private to securefed)",
        "securefed/inner/_c.py:2: securefed._hidden._X (private to securefed._hidden)",
        "securefed/inner/a.py:2: securefed._hidden (private to securefed)",
        "securefed/inner/b.py:2: securefed.inner._c._y (private to securefed.inner._c)",  # a sibling's private name
        "securefed/inner/b.py:3: securefed.inner.a._z (private to securefed.inner.a)",
        "securefed/inner/b.py:4: securefed.inner.a._w (private to securefed.inner.a)",
    ]

