"""The C extension: setuptools' pyproject tables cannot declare it with the setuptools this
project supports (``ext-modules`` there needs setuptools 74.1 and is experimental).

``optional=True``: on a machine without a C compiler the build of the extension fails, the
install goes on, and ``watcher.core.native`` falls back to the pure-Python rules.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "watcher.core._scan",
            sources=["watcher/core/_scan.c"],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
