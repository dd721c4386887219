"""What a user sees of the package itself: `splitserve --version` and its one source, the LICENSE."""
from __future__ import annotations

import hashlib
import tomllib
import warnings
from pathlib import Path

import pytest

import splitserve
from splitserve.launch import cli

REPO = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"splitserve {splitserve.__version__}\n"


def test_the_version_is_written_once():
    """pyproject.toml takes the version from splitserve.__version__ (no second literal to drift)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "splitserve.__version__"}
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ext-modules is experimental"
        built = read_configuration(REPO / "pyproject.toml", expand=True)
    assert built["project"]["version"] == splitserve.__version__  # what a build writes into the metadata


def test_license_file_is_the_license_pyproject_names():
    """LICENSE is the Apache License 2.0, unmodified (the sha256 of the text apache.org publishes),
    as pyproject.toml declares."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in text
    assert hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
