"""The wheel, installed where the source tree cannot be seen: it holds every file of the package, every module
imports from it, and its `spade-batch` console script runs.

A wheel once held only the top package (pyproject listed `spade_batch` alone, so its subpackages were left
out) while every test passed against the source tree. These tests use the built wheel only.

How the wheel is built: from a copy of pyproject.toml, README.md and spade_batch/ in a temporary folder, with
`pip wheel --no-deps --no-build-isolation --no-index`, so the test environment's setuptools builds it and
nothing is fetched. Building from a copy matters: setuptools reuses a `build/` folder left in the tree, and a
module deleted since an earlier build would still ship from there.

How it is installed, and why not `venv --system-site-packages`: the test environment is itself a virtual
environment (.venv) with spade_batch installed editable, so a child venv's "system" site-packages would be the
base interpreter's, without torch or Ray. Instead the child venv is made from the base interpreter with no
site-packages of its own but the wheel (installed by the parent's pip with `--python`, `--no-deps`), plus one
.pth file that appends the parent's site-packages folders to sys.path. Python runs the .pth files of its own
site folders only, never those of a folder such a line adds, so the parent's editable finder
(`__editable__.spade_batch-*.pth`) is never installed, and the child's site-packages precedes the parent's
anyway. The checks then run with the child's interpreter, from an empty working folder, without PYTHONPATH or
the user site, and assert that every spade_batch module was loaded from the child's site-packages.

Takes about 11 s on 2 cores: 2 s to build and install, 8.5 s to import every module (torch and Ray once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def _repository_root() -> Path:
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "spade_batch").is_dir():
            return folder
    raise RuntimeError(f"no repository root (pyproject.toml beside spade_batch/) above {__file__}")


REPO = _repository_root()
PACKAGE = "spade_batch"


def _source_files() -> set[str]:
    """Every file of the package in the source tree, as the wheel names it (compiled caches left out)."""
    return {
        path.relative_to(REPO).as_posix()
        for path in (REPO / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    }


def _project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no [project] version"
    return match.group(1)


def _isolated_env() -> dict[str, str]:
    """The environment for the child's processes: no PYTHONPATH (or other path-changing variable), no user site."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    scripts: Path
    site_packages: Path
    elsewhere: Path
    """An empty working folder for the child's processes."""

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, cwd=self.elsewhere, env=_isolated_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        env=_isolated_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"pip {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation, by this environment's setuptools")
    root = tmp_path_factory.mktemp("wheel")

    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    dist = root / "dist"
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(dist), str(source), cwd=root)
    (wheel,) = dist.glob("spade_batch-*.whl")

    child = root / "child"
    venv.EnvBuilder(with_pip=False).create(child)
    scripts = child / ("Scripts" if os.name == "nt" else "bin")
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    _pip("--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel), cwd=root)

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=elsewhere,
        env=_isolated_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    site_packages = Path(probe.stdout.strip())
    # Path lines only: the parent's own .pth files (its editable finder for spade_batch) are not run.
    parent = [folder for folder in site.getsitepackages() if Path(folder).is_dir()]
    (site_packages / "_parent_environment.pth").write_text("".join(f"{folder}\n" for folder in parent))
    return Installed(wheel, python, scripts, site_packages, elsewhere)


def test_the_wheel_holds_exactly_the_package_files_of_the_source_tree(installed: Installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        shipped = {name for name in wheel.namelist() if name.startswith(f"{PACKAGE}/")}
    source = _source_files()
    assert source, f"no files under {REPO / PACKAGE}"
    assert not source - shipped, f"files of the source tree missing from the wheel: {sorted(source - shipped)}"
    assert not shipped - source, f"files in the wheel that the source tree does not have: {sorted(shipped - source)}"


def test_every_module_imports_from_the_installed_wheel(installed: Installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        modules = sorted(
            name[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            for name in wheel.namelist()
            if name.startswith(f"{PACKAGE}/") and name.endswith(".py")
        )
    script = (
        "import importlib, json, sys\n"
        f"names = {modules!r}\n"
        "print(json.dumps({name: importlib.import_module(name).__file__ for name in names}))\n"
    )
    done = installed.run(str(installed.python), "-c", script)
    files = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(files) == set(modules)
    site_packages = installed.site_packages.resolve()
    outside = {name: path for name, path in files.items() if site_packages not in Path(path).resolve().parents}
    assert not outside, f"modules not loaded from the wheel installed in {site_packages}: {outside}"
    assert Path(files[PACKAGE]).resolve() == site_packages / PACKAGE / "__init__.py"


def test_the_console_script_prints_the_package_version(installed: Installed):
    version = _project_version()
    source_version = re.search(r'__version__\s*=\s*"([^"]+)"', (REPO / PACKAGE / "__init__.py").read_text())
    assert source_version and source_version.group(1) == version, "spade_batch.__version__ differs from pyproject.toml's version"
    done = installed.run(str(installed.scripts / "spade-batch"), "--version")
    assert done.stdout.strip() == f"spade-batch {version}"
