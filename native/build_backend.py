"""In-tree PEP 517 backend: setuptools, plus the cffi extension and the
fast-path extension.

cffi hooks into setuptools through the ``cffi_modules`` argument of
``setup()``.  Rather than keep a ``setup.py`` at the top level only to pass
it, this backend runs setuptools' own backend with that one argument.
"""

from __future__ import annotations

from build_native import compile_args, link_args
from setuptools import Extension, setup
from setuptools import build_meta as _build_meta

CFFI_MODULES = ["native/build_native.py:ffibuilder"]
#: the hot calls as CPython vectorcall objects (native/fastpath.c); they call
#: the eng_* functions of engine._native through their addresses
FASTPATH = Extension("engine._fastpath", sources=["native/fastpath.c"], include_dirs=["native"],
                     extra_compile_args=compile_args(), extra_link_args=link_args())


class _Backend(_build_meta._BuildMetaBackend):
    def run_setup(self, setup_script: str = "setup.py") -> None:
        setup(cffi_modules=CFFI_MODULES, ext_modules=[FASTPATH])


_backend = _Backend()
get_requires_for_build_wheel = _backend.get_requires_for_build_wheel
get_requires_for_build_sdist = _backend.get_requires_for_build_sdist
get_requires_for_build_editable = _backend.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _backend.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _backend.prepare_metadata_for_build_editable
build_wheel = _backend.build_wheel
build_sdist = _backend.build_sdist
build_editable = _backend.build_editable
