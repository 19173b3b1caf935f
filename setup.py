"""The optional C extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # Optional: without a compiler the package installs and runs its Python methods.
        Extension("forksafe._speedups", ["forksafe/_speedups.c"], optional=True),
    ],
)
