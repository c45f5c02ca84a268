"""The README's paper map cannot rot: every `file.py:function` it names exists (parsed with ast, not
imported), every row names code or says it is not implemented, and Algorithm 1's lines 1-18 and
Eqs. (1)-(4) are all mapped."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = re.compile(r"`([\w/]+\.py):([\w.]+)`")


def paper_map(readme=os.path.join(ROOT, "README.md")) -> list[tuple[str, str, str]]:
    """(paper, what, code) for every row of the README's "Paper map" table."""
    text = open(readme, encoding="utf-8").read()
    section = text.split("\n## Paper map\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]   # without the header
    cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in rows]
    assert all(len(c) == 3 for c in cells), [c for c in cells if len(c) != 3]
    return [tuple(c) for c in cells]


def defined(path: str, dotted: str) -> bool:
    """Is `dotted` (function, Class, Class.method, CONSTANT) defined at the top level of the file `path`?"""
    scope = ast.parse(open(path, encoding="utf-8").read()).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else
                     [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else [])
            if part in names:
                found = node
        if found is None:
            return False
        scope = found.body if isinstance(found, ast.ClassDef) else []   # methods, not nested functions
    return True


def references(rows):
    return [(path, name) for _, _, code in rows for path, name in REFERENCE.findall(code)]


def test_every_mapped_function_exists():
    rows = paper_map()
    assert len(rows) >= 30
    missing = [f"{path}:{name}" for path, name in references(rows)
               if not os.path.isfile(os.path.join(ROOT, path)) or not defined(os.path.join(ROOT, path), name)]
    assert not missing, f"the paper map names code that does not exist: {missing}"


def test_every_row_names_code_or_says_it_is_not_implemented():
    for paper, what, code in paper_map():
        assert REFERENCE.search(code) or "not implemented" in code, (paper, what, code)


def test_algorithm_1_lines_and_the_equations_are_all_mapped():
    rows = paper_map()
    lines = set()
    for paper, _, code in rows:
        if REFERENCE.search(code):
            for first, last in re.findall(r"Alg\. 1 lines? (\d+)(?:-(\d+))?", paper):
                lines.update(range(int(first), int(last or first) + 1))
    assert lines == set(range(1, 19))
    papers = " ".join(paper for paper, _, _ in rows)
    assert all(f"Eq. ({n})" in papers for n in (1, 2, 3, 4))


def test_the_checks_can_fail(tmp_path):
    """The resolver finds top-level functions, classes and methods, and nothing else."""
    source = tmp_path / "m.py"
    source.write_text("X = 1\ndef f():\n    def inner(): pass\nclass C:\n    def method(self): pass\n")
    assert all(defined(str(source), name) for name in ("X", "f", "C", "C.method"))
    assert not any(defined(str(source), name) for name in ("g", "inner", "f.inner", "C.other", "D.method"))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Paper map\n\n| paper | what | code |\n|---|---|---|\n"
                      "| §4.1, Eq. (2) | f | `search.py:no_such_function` |\n\n## Next\n")
    (path, name), = references(paper_map(str(readme)))
    assert not defined(os.path.join(ROOT, path), name)
    with pytest.raises(IndexError):
        paper_map(str(tmp_path / "m.py"))          # no "Paper map" section: an error, not an empty table
