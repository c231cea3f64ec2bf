"""The store seam (engine/store/): one factory chooses the backend by url,
``engine.core`` names no backend, both stores answer every call of the
``Store`` interface, and tools reach the store through ``Engine.store`` and
``Engine.seg``.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import tempfile
import typing

import pytest
from conftest import create_args, redis_url

import engine.core
from engine import ArgumentError, ClosedError, Engine, Outcome, Trigger
from engine._native import ffi, lib
from engine.store import Store, backend
from engine.store.redis import RedisBackend, RedisStore
from engine.store.shm import SHARED_MEMORY

BACKENDS = ("shm", "redis")
ROOT = pathlib.Path(__file__).resolve().parent.parent
STORE_CALLS = sorted(n for n in Store.__dict__ if n.startswith("eng_"))


def positional_arity(fn: typing.Any) -> int:
    """How many positional parameters a method takes after self."""
    params = list(inspect.signature(fn).parameters.values())
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name != "self"])



def _generated_stub() -> ast.Module:
    """What native/gen_stub.py writes now, parsed."""
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "_native.pyi"
        subprocess.run([sys.executable, str(ROOT / "native" / "gen_stub.py"), str(out)],
                       check=True, cwd=ROOT)
        return ast.parse(out.read_text())


# parsed at collection, before any test runs: CPython 3.11's AST constructor can fail
# ("recursion depth mismatch") in a process where an earlier test hit a RecursionError
CORE_TREE = ast.parse(pathlib.Path(engine.core.__file__).read_text())
STUB_TREE = _generated_stub()

class TestFactory:
    def test_none_is_shared_memory_and_a_redis_url_is_redis(self) -> None:
        """backend(None) is the shared-memory backend; every Redis scheme is Redis."""
        assert backend(None) is SHARED_MEMORY
        for url in ("redis://127.0.0.1:1/0", "rediss://h:1", "unix:///tmp/r.sock",
                    "redis+cluster://h:1"):
            b = backend(url)
            assert isinstance(b, RedisBackend) and b.url == url

    def test_another_scheme_is_refused_with_the_url(self) -> None:
        """A url of another scheme raises ArgumentError naming it; nothing connects."""
        with pytest.raises(ArgumentError, match="http://example"):
            backend("http://example:80/")

    def test_core_imports_no_backend(self) -> None:
        """engine/core.py imports neither backend module, only engine.store's factory."""
        tree = CORE_TREE
        imported = {f"{n.module}.{a.name}" for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) for a in n.names} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m.startswith(("engine.store.shm", "engine.store.redis"))
                    or "redis" in m or "segment" in m}, imported
        assert "engine.store.backend" in imported


class TestInterface:
    def test_lib_answers_every_call_with_its_arity(self) -> None:
        """Every Store call is a C function of lib taking as many arguments."""
        for name in STORE_CALLS:
            assert len(ffi.typeof(getattr(lib, name)).args) == positional_arity(
                getattr(Store, name)), name

    def test_redis_store_answers_every_call_with_its_arity(self) -> None:
        """Every Store call is a RedisStore method taking as many positional arguments."""
        for name in STORE_CALLS:
            assert positional_arity(getattr(RedisStore, name)) == positional_arity(
                getattr(Store, name)), name

    def test_the_generated_stub_declares_every_c_function(self) -> None:
        """native/gen_stub.py writes one method per C function of lib, with its arity."""
        tree = STUB_TREE
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        functions = {n for n in dir(lib) if n.startswith("eng_")
                     and ffi.typeof(getattr(lib, n)).kind == "function"}
        assert set(methods) == functions
        for name, f in methods.items():
            taken = len(f.args.posonlyargs) + len(f.args.args) - 1   # (less self)
            assert taken == len(ffi.typeof(getattr(lib, name)).args), name


class TestEngineStore:
    def test_store_and_seg_are_the_raw_call_pair(self, backend: str) -> None:
        """eng.store.eng_transition(eng.seg, ...) gives the public call's outcome on either store.

        eng.store.eng_transition(eng.seg, ...) is the raw call: the same
        outcome code as the public call, on either store.
        """
        with Engine.create(capacity=4, **create_args(backend)) as eng:
            try:
                pos = eng.open_position(100.0, 1.0)
                rc = eng.store.eng_transition(eng.seg, pos, int(Trigger.POSITION_OPENED))
                assert rc == Outcome.APPLIED
                assert eng.store.eng_state(eng.seg, pos) == int(eng.state(pos))
            finally:
                eng.unlink()

    def test_shared_memory_store_is_lib_itself(self) -> None:
        """On shared memory the store is lib (no wrapper) and seg its eng_seg *."""
        with Engine.create(capacity=4) as eng:
            try:
                assert eng.store is lib
                assert ffi.typeof(eng.seg) is ffi.typeof("eng_seg *")
            finally:
                eng.unlink()

    def test_redis_store_is_its_own_seg(self) -> None:
        """On Redis the store is the RedisStore, and its own first argument."""
        with Engine.create(capacity=4, url=redis_url()) as eng:
            try:
                assert isinstance(eng.store, RedisStore) and eng.seg is eng.store
            finally:
                eng.unlink()

    def test_raw_calls_after_close_say_closed(self, backend: str) -> None:
        """Raw calls after close, through the store or a kept seg, say closed.

        After close, a raw call through eng.store and eng.seg, or through a
        seg kept from before the close, says closed: ENG_ECLOSED (C), or
        ClosedError (a RedisStore raises the engine's exceptions itself).
        Forbidden: any other answer, a call reaching the unmapped segment.
        """
        eng = Engine.create(capacity=4, **create_args(backend))
        try:
            pos = eng.open_position(100.0, 1.0)
            kept = eng.seg
            eng.close()
            for seg in (eng.seg, kept):
                assert eng.store.eng_check(seg) == lib.ENG_ECLOSED
                try:
                    rc = eng.store.eng_state(seg, pos)
                except ClosedError:
                    rc = lib.ENG_ECLOSED
                assert rc == lib.ENG_ECLOSED
        finally:
            Engine.attach(eng.handle).unlink()
