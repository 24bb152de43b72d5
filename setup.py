"""The one thing pyproject.toml cannot say stably: the C extensions, the Check lane
(docs/decisions/0008-check-lane.md), the builder's fold (authz_sidecar/model/_fold.c) and the
reader of canonical grant text (authz_sidecar/documents/_granttext.c). Optional, so that a machine
without a C compiler still installs the sidecar, which then does all three in Python;
tests/test_checklane.py, tests/test_fold.py and tests/test_granttext.py fail where they were not
built."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("authz_sidecar.fronts._checklane", ["authz_sidecar/fronts/_checklane.c"], optional=True),
        Extension("authz_sidecar.model._fold", ["authz_sidecar/model/_fold.c"], optional=True),
        Extension("authz_sidecar.documents._granttext", ["authz_sidecar/documents/_granttext.c"], optional=True),
    ]
)
