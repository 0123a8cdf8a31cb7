"""The Debian package: debian/ itself (fast) and the built .deb (slow: it builds it).

The package installed and run under a real systemd is tests/test_container.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from package import (
    DEBIAN,
    PACKAGE,
    SYSTEM_PATH,
    binary_relations,
    changelog_version,
    control_paragraphs,
    deb_extract,
    deb_field,
    deb_listing,
    relation_names,
)
from tools import ROOT, require_tool

import kamstrup_textfile

SERVICE = ROOT / "kamstrup.service"
TIMER = ROOT / "kamstrup.timer"


# --------------------------------------------------------------------------
# debian/ (no build)


def test_changelog_version_is_the_module_version():
    assert changelog_version() == kamstrup_textfile.__version__


def test_changelog_version_check_reads_the_newest_entry(tmp_path, monkeypatch):
    """The check above means something: another version in the first line is seen."""
    import package

    fake = tmp_path / "debian"
    fake.mkdir()
    text = (DEBIAN / "changelog").read_text(encoding="utf-8")
    (fake / "changelog").write_text(
        text.replace(f"({kamstrup_textfile.__version__})", "(9.9.9)", 1), encoding="utf-8"
    )
    monkeypatch.setattr(package, "DEBIAN", fake)
    assert package.changelog_version() == "9.9.9"


def test_license_file_is_the_licence_debian_copyright_gives():
    """The project's LICENSE, setup.cfg and debian/copyright say the same licence."""
    copyright_text = (DEBIAN / "copyright").read_text(encoding="utf-8")
    paragraphs = copyright_text.split("\n\n")
    own = next(p for p in paragraphs if p.startswith("Files: *\n"))
    holder = re.search(r"^Copyright: 2026 (.+?) <", own, re.M).group(1)
    assert "License: MIT" in own
    text = next(p for p in paragraphs if p.startswith("License: MIT\n"))
    body = "\n".join(line[1:].replace(".", "", 1) if line == " ." else line[1:]
                      for line in text.splitlines()[1:])  # fmt: skip
    license_file = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_file.startswith(f"MIT License\n\nCopyright (c) 2026 {holder}\n\n")
    assert license_file.endswith(body.strip() + "\n")
    assert re.search(r"^license = MIT$", (ROOT / "setup.cfg").read_text(), re.M)


def test_source_is_debhelper_13_native():
    source, binary = control_paragraphs()
    assert source["Source"] == PACKAGE
    assert "debhelper-compat (= 13)" in source["Build-Depends"]
    assert "dh-python" in relation_names(source["Build-Depends"])
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    assert binary["Package"] == PACKAGE
    assert binary["Architecture"] == "all"


def test_depends_and_recommends():
    depends, recommends = binary_relations()
    assert {"python3", "python3-serial", "python3-click"} <= set(depends)
    assert recommends == ["prometheus-node-exporter"]


def test_relation_names_drop_versions_and_substvars():
    assert relation_names("a (>= 1), b:any,\n ${misc:Depends}, c") == ["a", "b", "c"]


def test_one_source_unit():
    """debian/ keeps no second copy of the units: the build derives them."""
    units = sorted(p.name for p in DEBIAN.iterdir() if p.suffix in (".service", ".timer"))
    # generated files of an earlier build in this tree are not in git; only look at
    # what would be committed
    tracked = subprocess.run(
        ["git", "ls-files", "debian"], cwd=ROOT, capture_output=True, text=True
    )
    if tracked.returncode == 0:
        units = [u for u in units if f"debian/{u}" in tracked.stdout.split()]
    assert units == []
    rules = (DEBIAN / "rules").read_text()
    assert "kamstrup.service >debian/kamstrup-textfile.kamstrup.service" in rules
    assert f"ExecStart={'/usr/local/bin/kamstrup-textfile --once'}" in SERVICE.read_text()


# --------------------------------------------------------------------------
# the built .deb

slow = pytest.mark.slow


@slow
def test_deb_name_and_fields(built_deb):
    assert built_deb.name == f"{PACKAGE}_{kamstrup_textfile.__version__}_all.deb"
    assert deb_field(built_deb, "Package") == PACKAGE
    assert deb_field(built_deb, "Version") == kamstrup_textfile.__version__
    assert deb_field(built_deb, "Architecture") == "all"
    depends = relation_names(deb_field(built_deb, "Depends"))
    assert {"python3", "python3-serial", "python3-click"} <= set(depends)
    assert relation_names(deb_field(built_deb, "Recommends")) == ["prometheus-node-exporter"]


@slow
def test_deb_installs_commands_module_units_and_config(built_deb):
    files = deb_listing(built_deb)
    for path, mode in [
        ("/usr/bin/kamstrup-textfile", "-rwxr-xr-x"),
        ("/usr/bin/kamstrup-sim", "-rwxr-xr-x"),
        ("/usr/lib/python3/dist-packages/kamstrup_textfile.py", "-rw-r--r--"),
        ("/usr/lib/python3/dist-packages/kamstrup_mbus.py", "-rw-r--r--"),
        ("/usr/lib/python3/dist-packages/kamstrup_kmp.py", "-rw-r--r--"),
        ("/usr/lib/python3/dist-packages/kamstrup_port.py", "-rw-r--r--"),
        ("/usr/lib/python3/dist-packages/kamstrup_sim.py", "-rw-r--r--"),
        ("/lib/systemd/system/kamstrup.service", "-rw-r--r--"),
        ("/lib/systemd/system/kamstrup.timer", "-rw-r--r--"),
        ("/etc/default/kamstrup", "-rw-r--r--"),
        ("/usr/share/doc/kamstrup-textfile/examples/10-usbports.rules", "-rw-r--r--"),
        ("/usr/share/doc/kamstrup-textfile/copyright", "-rw-r--r--"),
        ("/usr/share/man/man1/kamstrup-textfile.1.gz", "-rw-r--r--"),
        ("/var/lib/prometheus/node-exporter", "drwxr-xr-x"),
    ]:
        assert path in files, path
        assert files[path] == (mode, "root/root"), path
    # byte code is made on the machine by py3compile (postinst), not shipped
    assert not [p for p in files if p.endswith(".pyc") or "__pycache__" in p]
    # no udev rule is active: its serial number must be edited first
    assert not [p for p in files if "/rules.d/" in p]
    # nothing under /usr/local, and no file of the pip route
    assert not [p for p in files if p.startswith("/usr/local")]


@slow
def test_deb_units_are_the_repository_units_with_the_package_command(built_deb, tmp_path):
    root = deb_extract(built_deb, tmp_path / "x")
    packaged = (root / "lib/systemd/system/kamstrup.service").read_text()
    source = SERVICE.read_text()
    # the only changes: a header comment, Documentation=, and the command's path
    added = [line for line in packaged.splitlines() if line not in source.splitlines() and line]
    removed = [line for line in source.splitlines() if line not in packaged.splitlines()]
    assert removed == ["ExecStart=/usr/local/bin/kamstrup-textfile --once"]
    assert "ExecStart=/usr/bin/kamstrup-textfile --once" in added
    assert "Documentation=man:kamstrup-textfile(1)" in added
    assert all(line.startswith("#") for line in added if "=" not in line.split()[0]), added
    assert len(added) <= 5, added
    assert (root / "lib/systemd/system/kamstrup.timer").read_text() == TIMER.read_text()
    assert (root / "etc/default/kamstrup").read_text() == (ROOT / "kamstrup.default").read_text()
    assert (root / "usr/share/doc/kamstrup-textfile/examples/10-usbports.rules").read_bytes() == (
        ROOT / "10-usbports.rules"
    ).read_bytes()


@slow
def test_deb_maintainer_scripts(built_deb, tmp_path):
    root = deb_extract(built_deb, tmp_path / "x")
    control = root / "DEBIAN"
    assert (control / "conffiles").read_text().split() == ["/etc/default/kamstrup"]
    postinst = (control / "postinst").read_text()
    # byte-compiled on install, as Debian's Python packages are
    assert "py3compile -p kamstrup-textfile" in postinst
    # the timer is enabled and started; the service itself is not started by apt
    assert "deb-systemd-helper enable 'kamstrup.timer'" in postinst
    assert re.search(r"deb-systemd-invoke \$_dh_action 'kamstrup.timer'", postinst)
    assert "kamstrup.service" not in postinst
    assert "deb-systemd-invoke stop 'kamstrup.timer'" in (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    assert "deb-systemd-helper purge 'kamstrup.timer'" in postrm
    assert "/var/lib/prometheus/node-exporter/kamstrup.prom" in postrm


@slow
def test_lintian_reports_no_error(built_deb):
    """Errors fail; warnings are fixed or explained in debian/ (see debian/rules)."""
    lintian = require_tool("lintian")
    proc = subprocess.run(
        [lintian, "--fail-on", "error,warning", "--display-info", str(built_deb)],
        capture_output=True,
        text=True,
        env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        timeout=300,
    )
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIXPO]: ", line)]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [t for t in tags if t[0] in "EW"], tags
