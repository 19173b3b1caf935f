"""The C hot paths are in use when built, and step aside when asked to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from forksafe import speedups


def _built() -> bool:
    try:
        from forksafe import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_hot_method_is_c_exactly_when_the_extension_is_in_use() -> None:
    pure = bool(os.environ.get("FORKSAFE_PURE_PYTHON"))
    assert speedups.active is (_built() and not pure)
    for cls, names in speedups.HOT:
        for name in names:
            method = cls.__dict__[name]
            in_c = type(method).__name__ == "method_descriptor"
            assert in_c is speedups.active, f"{cls.__name__}.{name}"
            if speedups.active:
                assert callable(cls.__dict__[f"_py_{name}"]), f"{cls.__name__}._py_{name}"


@pytest.mark.skipif(
    not os.environ.get("CI") or not shutil.which(sysconfig.get_config_var("CC").split()[0]),
    reason="checked in CI, where a C compiler is present",
)
def test_ci_builds_the_extension() -> None:
    assert _built(), "forksafe._speedups was not built although a C compiler is present"


def test_the_environment_variable_keeps_the_python_methods() -> None:
    code = "import forksafe, forksafe.speedups as s; print(s.active)"
    env = dict(os.environ, FORKSAFE_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_installing_twice_changes_nothing() -> None:
    before = {(cls, name): cls.__dict__[name] for cls, names in speedups.HOT for name in names}
    assert speedups.install() is speedups.active
    after = {(cls, name): cls.__dict__[name] for cls, names in speedups.HOT for name in names}
    assert after == before
