"""cffi build of ``engine._native`` (out-of-line API mode).

The cdef is read from ``native/engine.h`` (the region between the cdef
markers), with every ``#define NAME value`` turned into ``#define NAME ...``
and every macro array bound into ``[...]``: the C compiler supplies the
numbers, so the header stays their one source.

Quick local build into the source tree: ``python native/build_native.py``.
Set ``ENGINE_SANITIZE=1`` to build with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "engine.h"


def cdef_from_header(text: str) -> str:
    """Return the cffi cdef for the header's cdef region."""
    body = text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]
    body = re.sub(r"^#define\s+(\w+)\s+.*$", r"#define \1 ...", body, flags=re.M)
    return re.sub(r"\[[A-Z_][A-Z0-9_ *]*\]", "[...]", body)


def compile_args() -> list[str]:
    args = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"]
    if os.environ.get("ENGINE_SANITIZE"):
        args += ["-O1", "-g", "-fno-omit-frame-pointer",
                 "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    return args


# The guard callback: C calls it inside eng_guard_transition (see engine/core.py).
CALLBACKS = """
extern "Python" int _engine_guard(void *, uint64_t, uint32_t, uint32_t);
"""

ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()) + CALLBACKS)
ffibuilder.set_source(
    "engine._native",
    '#include "engine.h"',
    # paths relative to the project root, where setuptools runs the build
    sources=[os.path.relpath(HERE / "engine.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=compile_args(),
    extra_link_args=["-fsanitize=address,undefined"] if os.environ.get("ENGINE_SANITIZE") else [],
)

if __name__ == "__main__":
    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
