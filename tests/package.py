"""The Debian package: its source metadata (debian/) and the built .deb.

`build_deb` builds the package the way the README says (`dpkg-buildpackage -us -uc -b`
at the top of a copy of the repository, the .deb in the directory above it), unless
TEST_DEB names one already built: .ci/run builds once, runs lintian on that file
and hands it to every test run, so the tests check the file lintian checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    from tools import ROOT, require_tool
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, require_tool

DEBIAN = ROOT / "debian"
PACKAGE = "kamstrup-textfile"
# Debian's own tools, whatever PATH the tests run with (a venv, pyenv).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# What a copy of the repository for a package build leaves out: local environments,
# caches, and what an earlier build left in the tree.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".benchmarks",
    ".pybuild",
    "build",
    "dist",
    "*.prom",
    ".venv-pymeterbus",
    ".venv-pykmp",
)


def changelog_version() -> str:
    """The version of the newest debian/changelog entry."""
    first = (DEBIAN / "changelog").read_text(encoding="utf-8").splitlines()[0]
    m = re.match(rf"^{re.escape(PACKAGE)} \(([^)]+)\) [a-z-]+; urgency=\w+$", first)
    assert m, f"not a debian/changelog entry line: {first!r}"
    return m.group(1)


def control_paragraphs() -> list[dict[str, str]]:
    """debian/control as a list of {field: value} (continuation lines joined)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", (DEBIAN / "control").read_text(encoding="utf-8").strip()):
        fields: dict[str, str] = {}
        name = None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t"):
                assert name, f"continuation line before any field: {line!r}"
                fields[name] += "\n" + line.strip()
            else:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        paragraphs.append(fields)
    return paragraphs


def relation_names(value: str) -> list[str]:
    """Package names of a Depends-style field, substitution variables left out."""
    names = []
    for item in value.replace("\n", " ").split(","):
        item = item.strip()
        if not item or item.startswith("${"):
            continue
        names.append(re.split(r"[\s(:]", item, maxsplit=1)[0])
    return names


def binary_relations() -> tuple[list[str], list[str]]:
    """(Depends, Recommends) of the binary package, as package names."""
    binary = control_paragraphs()[1]
    return relation_names(binary.get("Depends", "")), relation_names(binary.get("Recommends", ""))


def build_deb(workdir: Path) -> Path:
    """The built .deb: TEST_DEB if set, else built from a copy of the repository."""
    given = os.environ.get("TEST_DEB")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"TEST_DEB={given}: no such file", pytrace=False)
        return path
    require_tool("/usr/bin/dpkg-buildpackage")
    src = workdir / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_NOT_SOURCE)
    # Leftovers of a build in the repository itself are not sources either.
    for leftover in ("kamstrup-textfile", ".debhelper", "man", "files"):
        path = src / "debian" / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "DEB_BUILD_OPTIONS": "",
    }
    proc = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"dpkg-buildpackage failed ({proc.returncode}):\n{output}"
    deb = workdir / f"{PACKAGE}_{changelog_version()}_all.deb"
    assert deb.is_file(), sorted(p.name for p in workdir.iterdir())
    return deb


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), field],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": SYSTEM_PATH},
    ).stdout.strip()


def deb_listing(deb: Path) -> dict[str, tuple[str, str]]:
    """{path: (mode string, owner/group)} of the files in the .deb, paths without './'."""
    out = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": SYSTEM_PATH},
    ).stdout
    listing = {}
    for line in out.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        path = path.split(" -> ")[0]
        listing["/" + path.lstrip("./").rstrip("/")] = (mode, owner)
    return listing


def deb_extract(deb: Path, dest: Path) -> Path:
    """The .deb's files (dpkg-deb -x) and its control files (-e, in DEBIAN/) under dest."""
    env = {"PATH": SYSTEM_PATH}
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, env=env)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(dest / "DEBIAN")], check=True, env=env)
    return dest
