"""The suite's own rules: one docstring line per test naming its property, and
the process helpers check what they claim.

The docstring check runs once per test file, so a failure names the file and
lists its offenders (line, test, why): files merged from other branches show
up on their own.
"""

from __future__ import annotations

import ast
import multiprocessing as mp
import pathlib
import sys
import time

import pytest
from procs import sigkill

TESTS_DIR = pathlib.Path(__file__).resolve().parent
TEST_FILES = sorted(TESTS_DIR.glob("test_*.py"))
# parsed at collection, before any test runs: CPython 3.11's AST constructor can fail
# ("recursion depth mismatch") in a process where an earlier test hit a RecursionError
TREES = {p: ast.parse(p.read_text(), filename=str(p)) for p in TEST_FILES}
SENTENCE_ENDS = (".", "!", "?")
CLOSERS = ")]\"'`"   # a sentence may end inside a parenthesis or a quote: "(see x)." or "x.)"


def collected_tests(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The functions pytest collects: module-level test*, and test* methods of Test* classes."""
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("test"):
                    found.append(node)
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                visit(node.body)

    visit(tree.body)
    return found


def docstring_problem(doc: str | None) -> str | None:
    """Why a test's docstring breaks the rule, or None when it keeps it."""
    if not doc or not doc.strip():
        return "no docstring"
    summary = doc.strip().split("\n\n")[0]
    first = summary.splitlines()[0].strip()
    if "\n" in summary:
        return f"summary wraps onto a second line: {first!r}"
    if not first.rstrip(CLOSERS).endswith(SENTENCE_ENDS):
        return f"first line is not a complete sentence (no final stop): {first!r}"
    return None


def offenders(path: pathlib.Path) -> list[str]:
    """``line test: why`` for every test in ``path`` whose docstring breaks the rule."""
    tree = TREES.get(path) or ast.parse(path.read_text(), filename=str(path))
    out = []
    for fn in collected_tests(tree):
        problem = docstring_problem(ast.get_docstring(fn))
        if problem:
            out.append(f"{path.name}:{fn.lineno} {fn.name}: {problem}")
    return out


class TestDocstrings:
    """Every test says in one line the property it proves."""

    @pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
    def test_each_test_has_a_one_line_sentence_docstring(self, path):
        """Every test in the file has a docstring whose summary is one complete-sentence line."""
        bad = offenders(path)
        assert not bad, f"{len(bad)} test docstrings in {path.name} break the rule:\n" + \
            "\n".join(bad)

    @pytest.mark.parametrize("doc, problem", [
        (None, "no docstring"),
        ("A test proves\n        its property.", "wraps"),
        ("A test proves its property", "complete sentence"),
        ("A test proves its property.\n\n        More words on a second paragraph.", None),
        ("Forbidden: a hang (the bound is ``ANSWER_BOUND``).", None),
    ])
    def test_checker_flags_what_breaks_the_rule(self, doc, problem):
        """The checker flags a missing docstring, a wrapped summary and a missing final stop."""
        got = docstring_problem(doc)
        if problem is None:
            assert got is None, got
        else:
            assert got is not None and problem in got, got


CTX = mp.get_context("spawn")


class TestSigkill:
    """procs.sigkill proves the child died of the kill, not of something else."""

    def test_a_running_child_passes(self):
        """A child still running when sigkill() comes dies of SIGKILL and passes the check."""
        p = CTX.Process(target=time.sleep, args=(600,), daemon=True)
        p.start()
        sigkill(p)
        assert not p.is_alive()

    def test_a_child_that_exited_first_fails_the_check(self):
        """A child that exited on its own before sigkill() fails the check with its exit code."""
        p = CTX.Process(target=sys.exit, args=(3,), daemon=True)
        p.start()
        p.join(30)
        with pytest.raises(AssertionError, match="exit code 3"):
            sigkill(p)

    def test_a_child_that_exited_first_passes_when_the_caller_allows_it(self):
        """With may_have_exited=True, a child that exited on its own is reaped without a check."""
        p = CTX.Process(target=sys.exit, args=(3,), daemon=True)
        p.start()
        p.join(30)
        sigkill(p, may_have_exited=True)
        assert p.exitcode == 3
