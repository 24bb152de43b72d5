"""The one thing pyproject.toml cannot say stably: the Check lane's C extension
(docs/decisions/0008-check-lane.md). Optional, so that a machine without a C compiler still installs
the sidecar, which then answers every Check in Python; tests/test_checklane.py fails where it was
not built."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("authz_sidecar.fronts._checklane", ["authz_sidecar/fronts/_checklane.c"], optional=True),
    ]
)
