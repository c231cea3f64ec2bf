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
#: what engine.c is made of: every native/*.c and *.h but the fast path's own
#: extension (rebuild when any changes; the sdist ships them)
PARTS = sorted(f for f in [*HERE.glob("*.c"), *HERE.glob("*.h")] if f.name != "fastpath.c")


def cdef_from_header(text: str) -> str:
    """Return the cffi cdef for the header's cdef region."""
    body = text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]
    body = re.sub(r"^#define\s+(\w+)\s+.*$", r"#define \1 ...", body, flags=re.M)
    return re.sub(r"\[[A-Z_][A-Z0-9_ *]*\]", "[...]", body)


def compile_args() -> list[str]:
    args = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"]
    if os.environ.get("ENGINE_RELEASE"):
        args += ["-DENG_NO_TEST_FAULTS"]   # the test fault switch can never be turned on
    if os.environ.get("ENGINE_SANITIZE"):
        args += ["-O1", "-g", "-fno-omit-frame-pointer",
                 "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    return args


def link_args() -> list[str]:
    return ["-fsanitize=address,undefined"] if os.environ.get("ENGINE_SANITIZE") else []


# The guard callback: C calls it inside eng_guard_transition (see engine/core.py).
CALLBACKS = """
extern "Python" int _engine_guard(void *, uint64_t, uint32_t, uint32_t);
"""

# The GIL.  cffi releases and re-takes the GIL around every C call and saves
# and restores errno; for a call of ~100 ns that is a third of its cost.  Here
# the calls that cannot take long keep the GIL: the macros cffi's wrappers
# use are redefined after our own code, so they apply to the generated
# wrappers only.  The calls that can take long -- sleep in a futex wait,
# scan every slot, wait for recovery or attach, run a guard -- are routed
# (by a #define of their name) through a `_released` wrapper that releases
# it, so `lib.eng_wait_change` & co. release the GIL as before.  The engine
# never reads errno through ffi.errno.
#
# While one of them is in C, another thread may run -- and close the Engine.
# Each wrapper therefore enters the close gate (segment.c) before it releases
# the GIL and leaves it after: close() waits for the calls in the gate and
# refuses new ones (ENG_ECLOSED), so it never unmaps under a call.  The two
# attach calls are the exception: each fills a fresh eng_seg no other thread can see yet.
RELEASED = {   # name: (return type, parameters, arguments)
    "eng_attach": ("int", "eng_seg *s, void *base, uint64_t size, uint64_t fingerprint, int fd",
                   "s, base, size, fingerprint, fd"),
    "eng_attach_path": ("int", "eng_seg *s, void *base, uint64_t size, uint64_t fingerprint, "
                               "const char *path, uint64_t dev, uint64_t ino",
                        "s, base, size, fingerprint, path, dev, ino"),
    "eng_guard_transition": ("int", "eng_seg *s, uint64_t id, uint32_t trigger, "
                                    "const eng_ctx_update *u, eng_guard_fn guard, void *user",
                             "s, id, trigger, u, guard, user"),
    "eng_update_prices": ("int", "eng_seg *s, const uint64_t *ids, const double *prices, "
                                 "uint64_t n, uint64_t *out_bad_index, uint64_t *out_written",
                          "s, ids, prices, n, out_bad_index, out_written"),
    "eng_prices": ("int", "eng_seg *s, const uint64_t *ids, uint64_t n, eng_price_out *out, "
                          "uint64_t *out_bad_index", "s, ids, n, out, out_bad_index"),
    "eng_transition_many": ("int", "eng_seg *s, const uint64_t *ids, const uint32_t *triggers, "
                                   "uint64_t n, uint8_t *out, uint64_t *out_bad_index",
                            "s, ids, triggers, n, out, out_bad_index"),
    "eng_update_token_price": ("int64_t", "eng_seg *s, int64_t token, double price",
                               "s, token, price"),
    "eng_wait_change": ("int", "eng_seg *s, uint64_t id, int64_t since, int64_t timeout_ns, "
                               "int64_t *out_since", "s, id, since, timeout_ns, out_since"),
    "eng_journal_wait": ("int", "eng_seg *s, uint64_t after, int64_t timeout_ns, "
                                "uint64_t *out_seq", "s, after, timeout_ns, out_seq"),
    "eng_snapshot": ("int", "eng_seg *s, eng_row *rows, uint32_t max_rows, uint32_t *out_n",
                     "s, rows, max_rows, out_n"),
    "eng_accounts": ("int", "eng_seg *s, eng_account_row *rows, uint32_t max_rows, "
                            "uint32_t *out_n", "s, rows, max_rows, out_n"),
    "eng_recover": ("int", "eng_seg *s, eng_recover_report *out", "s, out"),
    # the journal's file writer (native/durable.c): pwrite, fdatasync, a scan
    "eng_durable_run": ("int", "eng_seg *s, eng_dw *w", "s, w"),
    "eng_durable_flush": ("int", "eng_seg *s, eng_dw *w, int64_t timeout_ns, uint64_t *out_seq",
                          "s, w, timeout_ns, out_seq"),
    "eng_durable_release": ("int", "eng_seg *s, eng_dw *w, int64_t timeout_ns, "
                                   "uint64_t *out_seq", "s, w, timeout_ns, out_seq"),
    "eng_durable_checkpoint": ("int", "eng_seg *s, eng_dw *w, uint64_t *out_start",
                               "s, w, out_start"),
}

# released, but outside the close gate (see above)
UNGATED = {"eng_attach", "eng_attach_path"}


def released_wrappers() -> str:
    """C source: the ``_released`` wrappers, the names routed through them,
    and the macros that keep the GIL in every other generated wrapper."""
    src, route = [], []
    for name, (ret, params, args) in RELEASED.items():
        gated = name not in UNGATED
        enter = "    if (eng_gate_enter(s))\n        return ENG_ECLOSED;\n" if gated else ""
        leave = "    eng_gate_leave(s);\n" if gated else ""
        src.append(f"static {ret} {name}_released({params})\n{{\n    {ret} rc;\n{enter}"
                   f"    Py_BEGIN_ALLOW_THREADS\n    rc = {name}({args});\n"
                   f"    Py_END_ALLOW_THREADS\n{leave}    return rc;\n}}")
        route.append(f"#define {name} {name}_released")
    keep_gil = """
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
#undef _cffi_restore_errno
#undef _cffi_save_errno
#define _cffi_restore_errno() ((void)0)
#define _cffi_save_errno() ((void)0)
"""
    return "\n\n".join(src) + "\n" + "\n".join(route) + "\n" + keep_gil


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()) + CALLBACKS)
ffibuilder.set_source(
    "engine._native",
    '#include "engine.h"\n' + released_wrappers(),
    # paths relative to the project root, where setuptools runs the build
    # engine.c alone: it #includes the other parts (one translation unit)
    sources=[os.path.relpath(HERE / "engine.c")],
    depends=[os.path.relpath(f) for f in PARTS],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=compile_args(),
    extra_link_args=link_args(),
)

if __name__ == "__main__":
    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
