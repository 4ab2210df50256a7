#!/usr/bin/env python3
"""The shape of audiotext.py: lines per section, and the rules that keep it a file a newcomer can
live in. Prints one line per section; exits 1, naming each breach, when

- a section is longer than MAX_SECTION_LINES,
- a class is longer than MAX_CLASS_LINES, or a function than MAX_FUNCTION_LINES,
- a section uses a name defined at the top level of a later section (each section may use only
  what stands above it, so that it can be read, and changed, knowing only those).

Sections are the banner comments: a rule of dashes, `# Name`, a rule of dashes.

    python3 .ci/sections.py [audiotext.py]
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_SECTION_LINES = 700
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60

_RULE = re.compile(r"^# -{20,}$")


@dataclass
class Section:
    name: str
    first: int  # 1-based, the banner's first line
    last: int = 0
    defines: set[str] = field(default_factory=set)

    @property
    def lines(self) -> int:
        return self.last - self.first + 1


def find_sections(lines: list[str]) -> list[Section]:
    """The module's preamble (docstring, imports) is a section of its own, named '(top)'."""
    sections = [Section("(top)", 1)]
    for i in range(len(lines) - 2):
        if _RULE.match(lines[i]) and lines[i + 1].startswith("# ") and _RULE.match(lines[i + 2]):
            sections[-1].last = i
            sections.append(Section(lines[i + 1][2:].strip(), i + 1))
    sections[-1].last = len(lines)
    return sections


def section_of(sections: list[Section], line: int) -> int:
    return max(i for i, s in enumerate(sections) if s.first <= line)


def top_level_names(node: ast.stmt) -> set[str]:
    """What a top-level statement defines: a def, a class, an assignment's targets."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def bound_names(scope: ast.AST) -> set[str]:
    """Names a function binds itself (parameters, assignments, imports, nested defs), which
    shadow the module's."""
    bound: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = scope.args
        bound |= {arg.arg for arg in a.posonlyargs + a.args + a.kwonlyargs}
        bound |= {arg.arg for arg in (a.vararg, a.kwarg) if arg is not None}
    for node in ast.walk(scope):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, _SCOPES) and node is not scope and not isinstance(node, ast.Lambda):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def used_names(node: ast.AST, shadowed: frozenset[str] = frozenset()) -> set[str]:
    """Module-level names a top-level statement reads, leaving out those its functions bind."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        shadowed = shadowed | bound_names(node)
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return set() if node.id in shadowed else {node.id}
    used: set[str] = set()
    for child in ast.iter_child_nodes(node):
        used |= used_names(child, shadowed)
    return used


def long_definitions(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_FUNCTION_LINES
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = (node.end_lineno or node.lineno) - first + 1
        if length > limit:
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            found.append(f"line {node.lineno}: {kind} {node.name} is {length} lines (limit {limit})")
    return found


def forward_uses(tree: ast.Module, sections: list[Section]) -> list[str]:
    owner: dict[str, int] = {}
    for node in tree.body:
        for name in top_level_names(node):
            owner.setdefault(name, section_of(sections, node.lineno))
    found = []
    for node in tree.body:
        here = section_of(sections, node.lineno)
        for name in sorted(used_names(node)):
            there = owner.get(name)
            if there is not None and there > here:
                found.append(f"line {node.lineno}: {sections[here].name} uses {name} "
                             f"from the later section {sections[there].name}")
    return found


def check(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    sections = find_sections(text.splitlines())
    for section in sections:
        print(f"{section.lines:6}  {section.name}")
    breaches = [f"section {s.name} is {s.lines} lines (limit {MAX_SECTION_LINES})"
                for s in sections if s.lines > MAX_SECTION_LINES]
    tree = ast.parse(text, filename=str(path))
    return breaches + long_definitions(tree) + forward_uses(tree, sections)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "audiotext.py")
    breaches = check(path)
    for breach in breaches:
        print(f"{path.name}: {breach}", file=sys.stderr)
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
