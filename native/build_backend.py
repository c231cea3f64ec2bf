"""In-tree PEP 517 backend: setuptools, plus the cffi extension.

cffi hooks into setuptools through the ``cffi_modules`` argument of
``setup()``.  Rather than keep a ``setup.py`` at the top level only to pass
it, this backend runs setuptools' own backend with that one argument.
"""

from __future__ import annotations

from setuptools import build_meta as _build_meta
from setuptools import setup

CFFI_MODULES = ["native/build_native.py:ffibuilder"]


class _Backend(_build_meta._BuildMetaBackend):
    def run_setup(self, setup_script: str = "setup.py") -> None:
        setup(cffi_modules=CFFI_MODULES)


_backend = _Backend()
get_requires_for_build_wheel = _backend.get_requires_for_build_wheel
get_requires_for_build_sdist = _backend.get_requires_for_build_sdist
get_requires_for_build_editable = _backend.get_requires_for_build_editable
prepare_metadata_for_build_wheel = _backend.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _backend.prepare_metadata_for_build_editable
build_wheel = _backend.build_wheel
build_sdist = _backend.build_sdist
build_editable = _backend.build_editable
