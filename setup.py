"""Build hook: ship the top-level ``schema.sql`` inside the ``ledger`` package of the built distribution.

The design card keeps ``schema.sql`` at the repository's top level, outside every package, so setuptools would
leave it out of a wheel and an installed ``jobledger serve`` could not create its tables. It is copied into the
build tree as ``ledger/schema.sql`` at build time (one source of truth, no second copy checked in);
``ledger.database`` reads it from there through ``importlib.resources``, or from the checkout when running from
one (editable installs and the tests).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithSchema(build_py):
    """``build_py`` plus the schema, copied into the built ``ledger`` package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's own file
            target = Path(self.build_lib) / "ledger" / "schema.sql"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / "schema.sql", target)


setup(cmdclass={"build_py": BuildWithSchema})
