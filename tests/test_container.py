"""The .deb under a real systemd: Debian 12 (bookworm) and Debian 13 (trixie, the stable
release, which Raspberry Pi OS follows) booted with systemd-nspawn, the package (built
on Debian 12) installed with apt, the units run against a simulated meter,
node_exporter and Prometheus reading the result, and apt purge leaving nothing behind.
Every test runs on both releases: one boot per release (the fixture is module-scoped
and parametrized over RELEASES).

How it runs on a machine whose PID 1 is not systemd (what was tried and works there):

- The root file system comes from debootstrap (minbase, systemd, dbus, python3, udev), from
  the Debian mirror this machine's apt sources name (read at run time: the repository
  names none). The Depends and Recommends of debian/control are downloaded into its apt
  cache (not installed), so that apt inside the container resolves them for real but
  needs no network. It is built once per release and cached under
  /var/cache/kamstrup-tests (set TEST_ROOTFS_CACHE for another place; a changed
  package list builds a new one); each release's fixture boots a throw-away copy.
- systemd-nspawn -b runs in a cgroup of its own (--register=no --keep-unit: there is
  no host systemd to register with), on the unified hierarchy
  (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) and with the bpf() system call allowed, so that
  the container's systemd can enforce DevicePolicy=; with --private-network, so that
  PrivateNetwork=yes units start cleanly.
- Commands run in the container with nsenter into all its namespaces (apt's maintainer
  scripts and systemctl must reach the container's systemd).
- Prometheus (the host's, from Debian's `prometheus` package) runs in the container's
  network namespace only: it scrapes node_exporter at 127.0.0.1:9100 without any
  network between host and container, and without installing Prometheus into the
  container. The test reaches its HTTP API from that namespace too.

udev does not run in the container (nspawn mounts /sys read-only and starts no udevd):
no adapter and no /dev/serial/by-id link appear there, and the tests make the links
themselves. 10-usbports.rules is checked with udev's own tools instead: `udevadm verify`
(systemd 254+, Debian 13), and `udevadm test` of every rule against a made-up FTDI
FT232R in a fake sysfs (both releases). Left untested, for real hardware: the kernel's
own sysfs for an adapter (a CH340 or PL2303 has no serial number, so the rule cannot
tell two of them apart and their by-id names collide); udevd handling the uevent (the
link made on plug-in, removed on unplug, the same after a move to another USB socket or
a reboot); GROUP= and MODE= applied to the real node; kamstrup.service opening a real
ttyUSB through the link under DevicePolicy=closed (tested here with a non-pty node);
the adapter's driver (termios, rates, the M-Bus level converter).

A container that does not boot fails the test; nothing here is ever skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from package import PACKAGE, SYSTEM_PATH, binary_relations
from tools import ROOT, parse_exposition, require_tool

import kamstrup_textfile

pytestmark = [pytest.mark.slow, pytest.mark.container]

CACHE = Path(os.environ.get("TEST_ROOTFS_CACHE", "/var/cache/kamstrup-tests"))
# The releases the container boots (debootstrap's suite names).
RELEASES = ("bookworm", "trixie")
BASE = ("systemd", "systemd-sysv", "dbus", "python3", "udev")  # udev: its tools only
ROOTFS_FORMAT = 1  # bump when the way the root file system is made changes
TEXTFILE = "/var/lib/prometheus/node-exporter/kamstrup.prom"
PORT = "/dev/ttymeterBus"
# A character device that is not a pty (systemd's DevicePolicy= always lets ptys
# through): 10:200 is /dev/net/tun, which systemd-nspawn allows in the container
# but kamstrup.service's DevicePolicy=closed does not.
OTHER_DEVICE = "/dev/ttyKamstrupOther"
OTHER_MAJOR_MINOR = ("10", "200")

# What kamstrup-sim's default meter (the MULTICAL 303 heat/cooling frame) reads as.
METER = 'meter="30303030"'
EXPECTED = {
    ("kamstrup_energy_joules_total", f"{{{METER}}}"): 154 * 3.6e6,
    ("kamstrup_volume_cubic_meters_total", f"{{{METER}}}"): 39.49,
    ("kamstrup_on_time_seconds_total", f"{{{METER}}}"): 2697 * 3600.0,
    ("kamstrup_temperature_celsius", f'{{{METER},sensor="flow"}}'): 29.3,
    ("kamstrup_temperature_celsius", f'{{{METER},sensor="return"}}'): 28.2,
    ("kamstrup_power_watts", f"{{{METER}}}"): 1400.0,
}
# The old exporter's names, recorded by rules/kamstrup-legacy.rules.yml, for that meter.
LEGACY = {
    ("kamstrup_energy_kwh_total", ()): 154.0,
    ("kamstrup_volume_m3_total", ()): 39.49,
    ("kamstrup_on_time_hours_total", ()): 2697.0,
    ("kamstrup_temperature_celcius", (("type", "flow"),)): 29.3,
    ("kamstrup_temperature_celcius", (("type", "return"),)): 28.2,
    ("kamstrup_temperature_celcius", (("type", "difference"),)): 1.1,
    ("kamstrup_power_w", ()): 1400.0,
    ("kamstrup_volume_flow_l_h", ()): 1128.0,
    ("kamstrump_energy_kwh_total", ()): 154.0,
}


# --------------------------------------------------------------------------
# the root file system


def _run_logged(cmd, log: Path, what: str, timeout: float, env=None) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: no result within {timeout} s (log: {log})", pytrace=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"{what} failed with status {proc.returncode}:\n{tail}", pytrace=False)


def _apt_sources(etc: Path = Path("/etc/apt")) -> list[dict[str, list[str]]]:
    """This machine's apt sources as [{"types": [...], "uris": [...], "suites": [...],
    "components": [...]}]: deb822 .sources files (field names in lower case, since
    they are case-insensitive) and one-line .list files alike."""
    found = []
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        for block in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields: dict[str, list[str]] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.split()
            if fields.get("enabled", ["yes"]) != ["no"]:
                found.append(fields)
    lists = [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]
    for path in (p for p in lists if p.is_file()):
        for line in path.read_text(errors="replace").splitlines():
            line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(line) >= 3:
                kind, uri, suite, *components = line
                found.append(
                    {"types": [kind], "uris": [uri], "suites": [suite], "components": components}
                )
    return found


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses: the source of its own release (the
    suite named VERSION_CODENAME in /etc/os-release) with the main component. Read at
    run time, so that the repository names no mirror and CI uses the one it has."""
    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    codename = release.get("VERSION_CODENAME", "").strip('"')
    for source in _apt_sources():
        if (
            "deb" in source.get("types", [])
            and codename in source.get("suites", [])
            and "main" in source.get("components", [])
            and source.get("uris")
        ):
            return source["uris"][0].rstrip("/")
    pytest.fail(
        f"no apt source of this machine serves {codename or 'its release'!r} main: "
        "debootstrap needs a Debian mirror (see /etc/apt/sources.list*)",
        pytrace=False,
    )


def rootfs(suite: str) -> Path:
    """The cached root file system of one release (built on first use, under a lock)."""
    debootstrap = require_tool("/usr/sbin/debootstrap")
    mirror = debian_mirror()
    depends, recommends = binary_relations()
    wanted = sorted(set(depends) | set(recommends))
    key = hashlib.sha256(repr((suite, mirror, BASE, wanted, ROOTFS_FORMAT)).encode())
    done = CACHE / f"rootfs-{suite}-{key.hexdigest()[:12]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done / ".complete").is_file():
            return done
        # an outdated root of this release, or one left half-built; the other
        # releases' roots stay
        for old in [*CACHE.glob(f"rootfs-{suite}-*"), *CACHE.glob(f"tmp-rootfs-{suite}-*")]:
            shutil.rmtree(old)
        tmp = CACHE / f"tmp-{done.name}"
        log = CACHE / f"rootfs-{suite}.log"
        log.write_text(f"building {done.name}\n")
        env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        _run_logged(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE)}",
                suite,
                str(tmp),
                mirror,
            ],
            log,
            "debootstrap",
            timeout=900,
            env=env,
        )
        chroot_apt = ["chroot", str(tmp), "apt-get", "-q", "-y"]
        _run_logged([*chroot_apt, "clean"], log, "apt-get clean", timeout=60, env=env)
        # apt inside the container installs these from its cache: downloaded with the
        # same resolution (Recommends included) as `apt install ./the.deb` makes.
        _run_logged(
            [*chroot_apt, "install", "--download-only", *wanted],
            log,
            "apt-get install --download-only",
            timeout=600,
            env=env,
        )
        (tmp / ".complete").write_text(" ".join(wanted) + "\n")
        tmp.rename(done)
    return done


# --------------------------------------------------------------------------
# the container


def _cgroup_bases() -> list[Path]:
    """Where to make the container's own cgroup: the v2 hierarchy, and on the hybrid
    layout also the name=systemd v1 hierarchy."""
    fs = Path("/sys/fs/cgroup")
    bases = []
    if (fs / "unified" / "cgroup.procs").exists():
        bases.append(fs / "unified")
    elif (fs / "cgroup.controllers").exists():
        bases.append(fs)
    if (fs / "systemd" / "cgroup.procs").exists():
        bases.append(fs / "systemd")
    return bases


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started through nsenter, and what nsenter forked for it."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Container:
    """A booted copy of the root file system; commands run inside it with nsenter."""

    def __init__(self, root: Path, name: str, log: Path):
        self.root = root
        self.name = name
        self.log = log
        self.nsenter = require_tool("/usr/bin/nsenter")
        self.proc: subprocess.Popen | None = None
        self.leader = 0
        self.cgroups: list[Path] = []
        self.suite = ""

    # -- life cycle

    def boot(self, timeout: float = 120) -> None:
        nspawn = require_tool("/usr/bin/systemd-nspawn")
        for base in _cgroup_bases():
            path = base / self.name
            path.mkdir()
            self.cgroups.append(path)

        def own_cgroup():
            for path in self.cgroups:
                (path / "cgroup.procs").write_text(str(os.getpid()))

        env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    nspawn,
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--system-call-filter=bpf",
                    "--console=pipe",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=own_cgroup,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                self._boot_failed(f"systemd-nspawn exited with status {self.proc.returncode}")
            self.leader = next((k for k in _children(self.proc.pid) if _comm(k) == "systemd"), 0)
            if time.monotonic() > deadline:
                self._boot_failed("no systemd as the container's PID 1")
            time.sleep(0.1)
        # right after the namespaces exist the container's bus may not answer yet
        # ("Failed to connect to bus"): ask again until systemd says a state
        while True:
            asked = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            )
            state = asked.stdout.strip()
            if state or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if state not in ("running", "degraded"):
            state = f"{state} ({asked.stderr.strip()})" if asked.stderr.strip() else state
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            self._boot_failed(f"system state {state!r}; failed units:\n{failed}")

    def _boot_failed(self, why: str) -> None:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"the container did not boot: {why}\n{tail}", pytrace=False)

    def halt(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM asks the container's systemd to power off; a second one ends it at
            # once (the container is thrown away: a slow stop job need not finish).
            for wait in (5, 15):
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=15)
        for path in self.cgroups:
            kill = path / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
        for path in self.cgroups:
            for _ in range(50):
                try:
                    for sub in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
                        if sub.is_dir():
                            sub.rmdir()
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)

    # -- running things inside

    def command(self, *cmd: str) -> list[str]:
        env = [
            f"PATH={SYSTEM_PATH}",
            "LANG=C.UTF-8",
            "DEBIAN_FRONTEND=noninteractive",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
        ]
        return [self.nsenter, "-t", str(self.leader), "-a", "env", "-i", *env, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120):
        proc = subprocess.run(self.command(*cmd), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(
                f"in the container: {' '.join(cmd)}: status {proc.returncode}\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                pytrace=False,
            )
        return proc

    def systemctl(self, *args: str) -> str:
        return self.run("systemctl", *args, check=False).stdout.strip()

    def path(self, inside: str) -> Path:
        """A path of the container's file system, seen from the host."""
        return self.root / inside.lstrip("/")

    def http_get(self, url: str) -> str:
        """GET from the container's network namespace (only there is its loopback)."""
        code = (
            "import sys, urllib.request\n"
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        )
        proc = subprocess.run(
            [self.nsenter, "-t", str(self.leader), "-n", sys.executable, "-c", code, url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise ConnectionError(proc.stderr.strip().splitlines()[-1:])
        return proc.stdout

    @contextmanager
    def background(self, *cmd: str):
        """A process in the container; yields it with its first line of output."""
        proc = subprocess.Popen(
            self.command(*cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"{' '.join(cmd)} in the container said nothing within 30 s"
            yield proc.stdout.readline()
        finally:
            _stop(proc)

    @contextmanager
    def meter(self, *faults: str, meters: tuple[str, ...] = ("303:48:30303030",)):
        """kamstrup-sim (from the package) on a pty of the container, as /dev/ttymeterBus:
        its default MULTICAL 303, with the simulator's faults (``silent``, ...) if given;
        or the simulator's --meter specifications `meters`, each a meter on the bus.
        """
        specs = [",".join([meters[0], *faults]), *meters[1:]]
        options = [arg for spec in specs for arg in ("--meter", spec)]
        with self.background("kamstrup-sim", *options) as first:
            m = re.search(r" on (/dev/pts/\d+) ", first)
            assert m, f"kamstrup-sim said {first!r}"
            self.run("ln", "-sfn", m.group(1), PORT)
            yield m.group(1)

    def start_service(self):
        """systemctl start kamstrup.service: (status, the tool's journal lines, the file)."""
        # a oneshot started more than 5 times in 10 s hits StartLimitBurst
        self.run("systemctl", "reset-failed", "kamstrup.service", check=False)
        proc = self.run("systemctl", "start", "kamstrup.service", check=False, timeout=400)
        invocation = self.systemctl("show", "--property=InvocationID", "--value", "kamstrup")
        assert re.fullmatch(r"[0-9a-f]{32}", invocation), invocation
        self.run("journalctl", "--sync", check=False)
        lines = self.run(
            "journalctl",
            f"_SYSTEMD_INVOCATION_ID={invocation}",
            "--output=cat",
            "--no-pager",
        ).stdout.splitlines()
        text = self.path(TEXTFILE).read_text() if self.path(TEXTFILE).exists() else ""
        return proc.returncode, lines, text


def samples(text: str) -> dict[tuple[str, str], float]:
    return {(name, labels): value for name, labels, value in parse_exposition(text)}


LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def labelled(text: str) -> list[tuple[str, frozenset, float]]:
    """[(name, {(label, value)}, value)] of a text exposition."""
    return [
        (name, frozenset(LABEL.findall(labels)), value)
        for name, labels, value in parse_exposition(text)
    ]


def of_address(text: str, name: str, address: str = "254") -> float | None:
    """The value of `name` for one address, whatever else labels it (bus, meter), or
    None when there is no such series."""
    found = [v for n, labels, v in labelled(text) if n == name and ("address", address) in labels]
    assert len(found) <= 1, text
    return found[0] if found else None


def wait_until(what: str, probe, timeout: float = 60, every: float = 0.5):
    """probe() until it returns something true; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (ConnectionError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout} s (last: {last!r})", pytrace=False)


@pytest.fixture(scope="module", params=RELEASES)
def container(request, built_deb):
    """One release booted with the package installed by apt; the timer is stopped after
    its state is recorded, so that no timer run falls between a test's steps. Module
    scope: pytest runs every test of the module on one release, then on the next."""
    if os.geteuid() != 0:
        pytest.fail("the container test must run as root (systemd-nspawn)", pytrace=False)
    suite = request.param
    base = rootfs(suite)
    work = Path(tempfile.mkdtemp(prefix="kamstrup-container-", dir="/var/tmp"))
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    shutil.copy(built_deb, root / "root" / built_deb.name)
    box = Container(root, f"kamstrup-test-{suite}-{os.getpid()}", work / "nspawn.log")
    box.suite = suite
    try:
        box.boot()
        box.install = box.run("apt-get", "install", "-y", f"/root/{built_deb.name}", timeout=600)
        box.after_install = {
            "is-enabled": box.systemctl("is-enabled", "kamstrup.timer"),
            "is-active": box.systemctl("is-active", "kamstrup.timer"),
        }
        box.run("systemctl", "stop", "kamstrup.timer")
        wait_until(
            "node_exporter listening in the container",
            lambda: "node_textfile_scrape_error" in box.http_get("http://127.0.0.1:9100/metrics"),
        )
        yield box
    finally:
        box.halt()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# install


def test_install_enables_and_starts_the_timer(container):
    assert container.after_install == {"is-enabled": "enabled", "is-active": "active"}
    assert container.systemctl("is-enabled", "kamstrup.timer") == "enabled"
    # apt took the Depends and Recommends from its cache (no network in the container)
    status = container.run(
        "dpkg-query",
        "--show",
        "--showformat=${Package} ${db:Status-Status}\\n",
        PACKAGE,
        "python3-serial",
        "python3-click",
        "prometheus-node-exporter",
    ).stdout.split("\n")
    assert [line.split()[1] for line in status if line] == ["installed"] * 4, status
    # byte-compiled on install by py3compile
    cache = container.path("/usr/lib/python3/dist-packages/__pycache__")
    assert list(cache.glob("kamstrup_textfile.cpython-3*.pyc"))
    version = container.run("kamstrup-textfile", "--version").stdout
    assert kamstrup_textfile.__version__ in version, version


def test_installed_units_verify_and_are_hardened(container):
    """The packaged units under the container's own systemd (252 on Debian 12, 257 on
    Debian 13)."""
    verify = container.run(
        "systemd-analyze", "verify", "--man=no", "kamstrup.service", "kamstrup.timer"
    )
    assert verify.stderr == "", verify.stderr
    security = container.run("systemd-analyze", "security", "--no-pager", "kamstrup.service")
    m = re.search(r"Overall exposure level for kamstrup.service: (\d+\.\d+)", security.stdout)
    assert m, security.stdout
    assert float(m.group(1)) <= 2.0, security.stdout
    shown = container.systemctl("show", "--property=ExecStart", "kamstrup.service")
    assert "path=/usr/bin/kamstrup-textfile ; argv[]=/usr/bin/kamstrup-textfile --once" in shown


def test_service_reads_the_meter(container):
    with container.meter():
        status, lines, text = container.start_service()
    assert status == 0, lines
    assert lines == []
    assert of_address(text, "kamstrup_up") == 1, text
    values = samples(text)
    for key, value in EXPECTED.items():
        assert values.get(key) == pytest.approx(value, rel=1e-12), key
    st = container.path(TEXTFILE).stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (0, 0, "0o644")
    assert container.systemctl("is-failed", "kamstrup.service") == "inactive"


def test_one_simulator_serves_successive_runs(container):
    """The timer's case: the same port read again and again (the pty set up anew)."""
    stamps = []
    with container.meter():
        for _ in range(3):
            status, lines, text = container.start_service()
            assert (status, lines) == (0, []), lines
            assert of_address(text, "kamstrup_up") == 1, text
            stamps.append(of_address(text, "kamstrup_last_success_timestamp_seconds"))
    assert stamps == sorted(stamps) and len(set(stamps)) == 3, stamps


def test_node_exporter_serves_our_series(container):
    with container.meter():
        status, lines, _ = container.start_service()
    assert status == 0, lines

    def scrape():
        text = container.http_get("http://127.0.0.1:9100/metrics")
        return samples(text) if of_address(text, "kamstrup_up") == 1 else None

    found = wait_until("kamstrup_up 1 in node_exporter's /metrics", scrape)
    assert found[("node_textfile_scrape_error", "")] == 0
    energy = ("kamstrup_energy_joules_total", f"{{{METER}}}")
    assert found[energy] == EXPECTED[energy]
    assert (
        "node_textfile_mtime_seconds",
        f'{{file="{TEXTFILE}"}}',
    ) in found


def test_silent_meter_fails_the_unit_with_one_line(container):
    with container.meter("silent"):
        status, lines, text = container.start_service()
    assert status != 0
    assert container.systemctl("is-failed", "kamstrup.service") == "failed"
    assert len(lines) == 1, lines
    assert re.fullmatch(r"kamstrup-textfile: address 254: .*no answer.*", lines[0]), lines
    assert of_address(text, "kamstrup_up") == 0, text


def test_missing_adapter_says_does_not_exist(container):
    container.run("rm", "-f", PORT)
    status, lines, text = container.start_service()
    assert status != 0
    assert len(lines) == 1, lines
    assert f"port {PORT} does not exist" in lines[0]
    assert of_address(text, "kamstrup_up") == 0, text


def test_device_policy_refuses_another_device(container):
    """DevicePolicy=closed with DeviceAllow=/dev/ttymeterBus: the same tool opening the
    same non-pty node is refused by the unit (EPERM from the device cgroup), while a
    plain transient unit in the same container opens it (and then fails on termios,
    since it is no serial port), and so does kamstrup.service through the link."""
    major, minor = OTHER_MAJOR_MINOR
    container.run("rm", "-f", OTHER_DEVICE)
    container.run("mknod", "-m", "0660", OTHER_DEVICE, "c", major, minor)
    try:
        # control: no device policy
        plain = container.run(
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "/usr/bin/kamstrup-textfile",
            "--once",
            "--output=-",
            f"--port={OTHER_DEVICE}",
            check=False,
        )
        assert plain.returncode == 1
        assert "not permitted" not in plain.stderr, plain.stderr
        assert "configure port" in plain.stderr, plain.stderr

        # kamstrup.service with the port set to the other node: refused
        dropin = container.path("/etc/systemd/system/kamstrup.service.d/other-port.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\nEnvironment=KAMSTRUP_PORT={OTHER_DEVICE}\n")
        container.run("systemctl", "daemon-reload")
        try:
            status, lines, _ = container.start_service()
        finally:
            dropin.unlink()
            dropin.parent.rmdir()
            container.run("systemctl", "daemon-reload")
        assert status != 0
        assert len(lines) == 1, lines
        assert "Operation not permitted" in lines[0], lines

        # the same node behind /dev/ttymeterBus: allowed
        container.run("ln", "-sfn", OTHER_DEVICE, PORT)
        status, lines, _ = container.start_service()
        assert status != 0
        assert len(lines) == 1, lines
        assert "not permitted" not in lines[0] and "configure port" in lines[0], lines
    finally:
        container.run("rm", "-f", OTHER_DEVICE, PORT)


# --------------------------------------------------------------------------
# the settings file: a hand run is the timer's run (issue 16)

# Two meters on the simulated bus, and the settings that name them.
BUS_METERS = ("303:48:30303030", "403:74:77447744")
BUS_SETTINGS = (
    "# written by tests/test_container.py\n"
    f"KAMSTRUP_PORT={PORT}\n"
    'KAMSTRUP_ADDRESS="48 74"\n'
    "KAMSTRUP_LABEL='location=\"boiler room\" building=north'\n"
)
BUS_UP = {
    frozenset({**meter, "bus": "kamstrup", "location": "boiler room", "building": "north"}.items())
    for meter in ({"address": "48", "meter": "30303030"}, {"address": "74", "meter": "77447744"})
}


def series_of(text: str) -> set:
    return {(name, labels) for name, labels, _ in labelled(text)}


def up(text: str) -> dict[frozenset, float]:
    return {labels: value for name, labels, value in labelled(text) if name == "kamstrup_up"}


def textfile_state(container: Container):
    """What a run must leave alone: the live file's bytes and mtime, and the names in its
    directory."""
    live = container.path(TEXTFILE)
    st = live.stat()
    return live.read_bytes(), st.st_mtime_ns, sorted(p.name for p in live.parent.iterdir())


@pytest.fixture
def settings(container):
    """Writes /etc/default/kamstrup; the package's own file (and no live file) afterwards."""
    path = container.path("/etc/default/kamstrup")
    shipped = path.read_bytes()
    yield lambda text: path.write_bytes(text.encode())
    path.write_bytes(shipped)
    container.run("rm", "-f", TEXTFILE)


def test_hand_run_reads_the_services_settings(container, settings):
    """`kamstrup-textfile --once` by hand as root writes what the timer's run writes."""
    settings(BUS_SETTINGS)
    with container.meter(meters=BUS_METERS):
        status, lines, by_service = container.start_service()
        assert (status, lines) == (0, []), lines
        container.run("rm", "-f", TEXTFILE)
        hand = container.run("kamstrup-textfile", "--once", check=False)
    assert (hand.returncode, hand.stdout, hand.stderr) == (0, "", "")
    by_hand = container.path(TEXTFILE).read_text()
    assert up(by_service) == dict.fromkeys(BUS_UP, 1.0), by_service
    assert up(by_hand) == up(by_service)
    assert series_of(by_hand) == series_of(by_service)


def test_hand_run_naming_the_links_device_is_the_timers_run(container, settings):
    """--port with the device KAMSTRUP_PORT's link points to is the configured bus: the
    live file, as the service writes it."""
    settings(BUS_SETTINGS)
    with container.meter(meters=BUS_METERS) as device:
        status, lines, by_service = container.start_service()
        assert (status, lines) == (0, []), lines
        container.run("rm", "-f", TEXTFILE)
        hand = container.run("kamstrup-textfile", "--once", f"--port={device}", check=False)
    assert (hand.returncode, hand.stdout, hand.stderr) == (0, "", "")
    by_hand = container.path(TEXTFILE).read_text()
    assert up(by_hand) == up(by_service) == dict.fromkeys(BUS_UP, 1.0), by_hand
    assert series_of(by_hand) == series_of(by_service)


def test_without_a_settings_file_both_read_the_defaults(container, settings):
    """No /etc/default/kamstrup (EnvironmentFile=- lets the service start): the hand run
    reads the defaults too, not an error."""
    container.run("rm", "-f", "/etc/default/kamstrup")
    with container.meter():
        status, lines, by_service = container.start_service()
        assert (status, lines) == (0, []), lines
        container.run("rm", "-f", TEXTFILE)
        hand = container.run("kamstrup-textfile", "--once", check=False)
    assert (hand.returncode, hand.stdout, hand.stderr) == (0, "", "")
    by_hand = container.path(TEXTFILE).read_text()
    assert of_address(by_service, "kamstrup_up") == of_address(by_hand, "kamstrup_up") == 1
    assert series_of(by_hand) == series_of(by_service)


def test_hand_run_of_one_meter_leaves_the_live_file(container, settings):
    """--address of one of the configured meters: the exposition on stdout, one line
    on stderr saying so; with --output naming the live file, a usage error. The live
    file is untouched either way."""
    settings(BUS_SETTINGS)
    with container.meter(meters=BUS_METERS):
        status, lines, _ = container.start_service()
        assert (status, lines) == (0, []), lines
        before = textfile_state(container)
        hand = container.run("kamstrup-textfile", "--once", "--address", "48", check=False)
        after_hand = textfile_state(container)
        named = container.run(
            "kamstrup-textfile", "--once", "--address=48", f"--output={TEXTFILE}", check=False
        )
        after_named = textfile_state(container)
    assert after_hand == before
    assert hand.returncode == 0, hand.stderr
    assert len(hand.stderr.splitlines()) == 1, hand.stderr
    assert [dict(labels)["address"] for labels in up(hand.stdout)] == ["48"], hand.stdout
    assert list(up(hand.stdout).values()) == [1.0], hand.stdout

    assert after_named == before
    assert (named.returncode, named.stdout) == (2, ""), named.stderr
    assert len(named.stderr.splitlines()) == 1, named.stderr


def test_comment_after_a_value_fails_the_service_and_writes_nothing(container, settings):
    """systemd keeps `# live` as part of KAMSTRUP_OUTPUT's value: a usage error, not a
    file named `kamstrup.prom # live` that node_exporter never reads."""
    settings(BUS_SETTINGS)
    with container.meter(meters=BUS_METERS):
        status, lines, _ = container.start_service()
        assert (status, lines) == (0, []), lines
        before = textfile_state(container)
        settings(BUS_SETTINGS + f"KAMSTRUP_OUTPUT={TEXTFILE} # live\n")
        status, lines, _ = container.start_service()
        after = textfile_state(container)
    assert status != 0
    assert container.systemctl("show", "--property=ExecMainStatus", "--value", "kamstrup") == "2"
    assert len(lines) == 1 and "KAMSTRUP_OUTPUT" in lines[0], lines
    assert not container.path(f"{TEXTFILE} # live").exists()
    assert after == before


@pytest.mark.parametrize(
    "line, named",
    [
        ("KAMSTRUP_VERSION=1.2", ["KAMSTRUP_VERSION"]),  # a person noting the version
        ("KAMSTRUP_ADRESS=74", ["KAMSTRUP_ADRESS", "KAMSTRUP_ADDRESS"]),  # a typo
    ],
)
def test_unknown_name_warns_and_the_service_reads_on(container, settings, line, named):
    settings(BUS_SETTINGS + line + "\n")
    container.run("rm", "-f", TEXTFILE)
    with container.meter(meters=BUS_METERS):
        status, lines, text = container.start_service()
    assert status == 0, lines
    assert len(lines) == 1, lines
    for name in named:
        assert re.search(rf"\b{name}\b", lines[0]), lines
    assert up(text) == dict.fromkeys(BUS_UP, 1.0), text


# Lines systemd's EnvironmentFile= and a parser of the same file can disagree on: the
# table in FIELD-NOTES.md's "two parsers" section, then escapes, continuations,
# comments, blanks and line ends. One name a line (KT_...), so that what each line
# gives can be told apart; joined, they are one file.
SETTINGS_LINES = (
    'KT_QUOTES_INSIDE=location="boiler room"\n',
    "KT_SINGLE_QUOTED='location=\"boiler room\" building=north'\n",
    'KT_DOUBLE_QUOTED="location=boiler room"\n',
    "KT_TRAILING_BLANKS=kamstrup.prom   \n",
    "KT_COMMENT_AFTER=x # comment\n",
    "KT_CRLF=value\r\n",
    'KT_ESCAPES_BARE=a\\b\\ c\\"d\\$e\\\\f\n',
    'KT_ESCAPES_DOUBLE="a\\b \\"q\\" \\$x \\\\ \\` \\n"\n',
    "KT_ESCAPES_SINGLE='a\\b \\n'\n",
    "KT_CONTINUED=first\\\nsecond\n",
    'KT_CONTINUED_DOUBLE="first \\\nsecond"\n',
    "# KT_HASH_COMMENT=1\n",
    "; KT_SEMICOLON_COMMENT=1\n",
    "# a comment ending in a backslash \\\nKT_AFTER_COMMENT_BACKSLASH=1\n",
    " \tKT_LEADING_BLANKS=lead\n",
    "KT_EMPTY=\n",
    "KT_BLANKS_AROUND_EQUALS = spaced value \n",
    "KT_NO_EQUALS\n",
    'KT_CRLF_DOUBLE="quoted"\r\n',
    "KT_SINGLE_NEWLINE='line one\nline two'\n",
    "KT_SINGLE_CRLF='one\r\ntwo'\r\n",
    "KT_LEADING_VALUE_BLANKS=   padded\n",
    "KT_QUOTE_THEN_TEXT='a b'c\n",
    "KT_TAB=a\tb\n",
    "KT_EQUALS=a=b=c\n",
    "KT_UTF8=Kesselraum Süd\n",
    "export KT_EXPORT=1\n",
    "KT BAD=1\n",
    "KT_TWICE=first\n",
    "KT_TWICE=second\n",
    "KT_CR_ALONE=a\rKT_AFTER_CR=b\n",
    'KT_QUOTED_THEN_BLANKS="a b"   \n',
    'KT_QUOTED_BLANK_TEXT="a" b\n',
    'KT_EMPTY_QUOTED=""\n',
    "KT_DOLLAR=$HOME ${PATH}\n",
    "KT_SEMICOLON_AFTER=x ; y\n",
    "  # KT_INDENTED_COMMENT=1\n",
    "KT_FORM_FEED=a\x0cb\n",
    "KT_LINE_SEPARATOR=a\u2028b\x85c\n",
    "kt_lower=x\n",
    "1KT_DIGIT_FIRST=x\n",
    "KT-DASH=x\n",
    "KT.DOT=x\n",
    "KT_LAST_LINE=no newline",
)
# What systemd 252 (Debian 12) passes for SETTINGS_LINES, seen in the container by
# test_settings_parsers_agree: what read_settings() must return for that file.
SYSTEMD_252_SETTINGS = {
    "KT_QUOTES_INSIDE": 'location="boiler room"',
    "KT_SINGLE_QUOTED": 'location="boiler room" building=north',
    "KT_DOUBLE_QUOTED": "location=boiler room",
    "KT_TRAILING_BLANKS": "kamstrup.prom",
    "KT_COMMENT_AFTER": "x # comment",
    "KT_CRLF": "value",
    "KT_ESCAPES_BARE": 'ab c"d$e\\f',
    "KT_ESCAPES_DOUBLE": 'a\\b "q" $x \\ ` \\n',
    "KT_ESCAPES_SINGLE": "a\\b \\n",
    "KT_CONTINUED": "firstsecond",
    "KT_CONTINUED_DOUBLE": "first second",
    "KT_LEADING_BLANKS": "lead",
    "KT_EMPTY": "",
    "KT_BLANKS_AROUND_EQUALS": "spaced value",
    "KT_CRLF_DOUBLE": "quoted",
    "KT_SINGLE_NEWLINE": "line one\nline two",
    "KT_LEADING_VALUE_BLANKS": "padded",
    "KT_QUOTE_THEN_TEXT": "a bc",
    "KT_TAB": "a\tb",
    "KT_EQUALS": "a=b=c",
    "KT_UTF8": "Kesselraum Süd",
    "KT_SINGLE_CRLF": "one\r\ntwo",
    "KT_TWICE": "second",
    "KT_CR_ALONE": "a",  # a lone CR ends the line
    "KT_AFTER_CR": "b",
    "KT_QUOTED_THEN_BLANKS": "a b",
    "KT_QUOTED_BLANK_TEXT": "ab",  # blanks after a closing quote are dropped
    "KT_EMPTY_QUOTED": "",
    "KT_DOLLAR": "$HOME ${PATH}",  # no expansion
    "KT_SEMICOLON_AFTER": "x ; y",
    "KT_FORM_FEED": "a\x0cb",  # kept: str.splitlines() would split there
    "KT_LINE_SEPARATOR": "a\u2028b\x85c",  # the same
    "kt_lower": "x",
    "KT_LAST_LINE": "no newline",
}
# systemd 257 (Debian 13) reads one line of them apart: a comment line ends at its line
# end even when it ends in a backslash (252 joins the next line to the comment).
SYSTEMD_257_SETTINGS = {**SYSTEMD_252_SETTINGS, "KT_AFTER_COMMENT_BACKSLASH": "1"}
SETTINGS_BY_RELEASE = {"bookworm": SYSTEMD_252_SETTINGS, "trixie": SYSTEMD_257_SETTINGS}


# Files that end in the middle of something (no line end after it): each file, and what
# systemd 252 passes for it.
SETTINGS_FILE_ENDS = {
    "KT_END='open single": {"KT_END": "open single"},
    "KT_END='open single\n": {"KT_END": "open single\n"},
    'KT_END="open double': {"KT_END": "open double"},
    'KT_END="open double\\': {"KT_END": "open double"},
    "KT_END=value\\": {"KT_END": "value"},
    "KT_END=first\\\nsecond\\": {"KT_END": "firstsecond"},
    "KT_END=\\": {"KT_END": ""},
    "KT_END=": {"KT_END": ""},
    "KT_END =  ": {"KT_END": ""},
    "KT_END=x   ": {"KT_END": "x"},
    "KT_END": {},
    "KT_END=x\n# comment\\": {"KT_END": "x"},
}


def environment_files(container: Container, texts: list):
    """[(path in the container, what systemd's EnvironmentFile= passes for it, or None when
    the unit does not start)]: one instance of a template unit a file, each dumping its
    environment with env -0; less what systemd sets itself (PATH, INVOCATION_ID, ...), as
    an instance with an empty file shows it."""
    top = "/root/kt-settings"
    container.run("rm", "-rf", top)
    container.path(top).mkdir()
    for i, text in enumerate(["", *texts]):
        data = text if isinstance(text, bytes) else text.encode()
        container.path(f"{top}/{i}.env").write_bytes(data)
    unit = container.path("/etc/systemd/system/kt-settings@.service")
    unit.write_text(
        "[Service]\nType=oneshot\n"
        f"EnvironmentFile={top}/%i.env\n"
        f"ExecStart=/usr/bin/env -0\nStandardOutput=file:{top}/%i.env0\n"
    )
    try:
        container.run("systemctl", "daemon-reload")
        instances = [f"kt-settings@{i}.service" for i in range(len(texts) + 1)]
        container.run("systemctl", "start", *instances, check=False, timeout=300)
        found = []
        for i in range(len(texts) + 1):
            dump = container.path(f"{top}/{i}.env0")
            if not dump.exists():
                found.append(None)
                continue
            pairs = dump.read_bytes().decode().split("\0")
            found.append(dict(pair.split("=", 1) for pair in pairs if pair))
        container.run("systemctl", "reset-failed", "kt-settings@*", check=False)
    finally:
        unit.unlink()
        container.run("systemctl", "daemon-reload")
    base, *found = found
    assert base is not None, "systemd did not start the unit with an empty EnvironmentFile="
    return [
        (f"{top}/{i + 1}.env", env and {k: v for k, v in env.items() if k not in base})
        for i, env in enumerate(found)
    ]


def read_settings(container: Container, paths: list[str]) -> list:
    """kamstrup_textfile.read_settings() of each file, by the installed module in the
    container: its result, or the exception it raised as text."""
    code = (
        "import sys, json, kamstrup_textfile as k\n"
        "def read(path):\n"
        "    try:\n"
        "        return k.read_settings(path)\n"
        "    except Exception as exc:\n"
        "        return repr(exc)\n"
        "print(json.dumps([read(path) for path in sys.argv[1:]]))\n"
    )
    tool = container.run("python3", "-c", code, *paths, check=False)
    assert tool.returncode == 0, tool.stderr
    return json.loads(tool.stdout)


def test_settings_parsers_agree(container):
    """The tool's read_settings() and systemd's EnvironmentFile= read one file alike."""
    texts = ["".join(SETTINGS_LINES), *SETTINGS_FILE_ENDS]
    paths, by_systemd = zip(*environment_files(container, texts))
    print("systemd:", json.dumps(by_systemd, indent=1))
    assert list(by_systemd) == [
        SETTINGS_BY_RELEASE[container.suite],
        *SETTINGS_FILE_ENDS.values(),
    ]
    # The tool reads as systemd 257 (Debian 13) does; on 252 only a comment ending in a
    # backslash is read apart (257 ends it at its line, 252 joined the next line), and
    # the tool warns of it (tests/test_settings.py).
    expected = [SYSTEMD_257_SETTINGS, *SETTINGS_FILE_ENDS.values()]
    assert read_settings(container, list(paths)) == expected


# A comment line whose last character before a line end is a backslash.
COMMENT_ENDS_IN_BACKSLASH = re.compile(r"(^|[\n\r])[ \t]*[#;][^\n\r]*\\[\n\r]")


def random_settings(rng: random.Random) -> str:
    """A settings file of a few lines made of the pieces the two parsers may read apart."""
    pieces = ["x", "y z", " ", "\t", '"', "'", "\\", "#", ";", "=", "$", "`", "é", "\r", "\n"]
    pieces += ["\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028"]  # str.split() and splitlines()
    lines = []
    for _ in range(rng.randint(1, 4)):
        line = rng.choice(["", "", " ", "\t", "#", ";", "export "])
        line += rng.choice(["KT_A", "KT_B", "kt_c", "KT_A ", "K T", "1KT", ""])
        if rng.random() < 0.9:
            line += rng.choice(["=", "=", " = ", "= "])
        line += "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        lines.append(line + rng.choice(["\n", "\n", "\r\n", "\\\n", "\r", ""]))
    return "".join(lines)


def test_settings_parsers_agree_on_random_files(container):
    """500 files of quotes, escapes, comments and line ends (the same every run): systemd
    and read_settings() read each alike; the files they disagree on are listed."""
    rng = random.Random(16)
    texts = [random_settings(rng) for _ in range(500)]
    by_systemd = environment_files(container, texts)
    refused = [texts[i] for i, (_, env) in enumerate(by_systemd) if env is None]
    assert refused == [], "systemd did not start with these files"
    by_tool = read_settings(container, [path for path, _ in by_systemd])
    disagree = [
        (text, env, tool)
        for text, (_, env), tool in zip(texts, by_systemd, by_tool)
        if env != tool
        and not (container.suite == "bookworm" and COMMENT_ENDS_IN_BACKSLASH.search(text))
    ]  # 252 joined a comment ending in a backslash to the next line; 257 and the tool do not
    assert disagree == [], "\n".join(f"{t!r}: systemd {e!r}, tool {o!r}" for t, e, o in disagree)


# Files systemd does not start a unit with ("Failed to load environment files": EINVAL
# for a name or value that is not UTF-8, EBADMSG for a NUL). kamstrup.service's
# EnvironmentFile=- makes systemd (252.39 and 257.13 alike) start it without the file,
# so the tool must refuse the file itself.
SETTINGS_SYSTEMD_REFUSES = (
    b"KAMSTRUP_LABEL=location=K\xf6ln\n",  # Latin-1
    b"KAMSTRUP_\xc4DDRESS=48\n",
    b"KAMSTRUP_LABEL='location=\xff\nKAMSTRUP_ADDRESS=48'\nKAMSTRUP_BAUDRATE=2400\n",
    b"KAMSTRUP_ADDRESS=48\x00\n",
    b"# a NUL in a comment \x00\nKAMSTRUP_ADDRESS=48\n",
)


def test_a_file_systemd_refuses_is_refused(container, settings):
    """What systemd does not start a unit with, read_settings() refuses (raises), and
    a hand run and kamstrup.service (started without the file: EnvironmentFile=-) refuse
    in one line (exit 2); the live file stays as it was."""
    found = environment_files(container, list(SETTINGS_SYSTEMD_REFUSES))
    assert [env for _, env in found] == [None] * len(found), found
    results = read_settings(container, [path for path, _ in found])
    assert all(isinstance(result, str) for result in results), results  # an exception

    settings(BUS_SETTINGS)
    with container.meter(meters=BUS_METERS):
        status, lines, _ = container.start_service()
        assert (status, lines) == (0, []), lines
        before = textfile_state(container)
        container.path("/etc/default/kamstrup").write_bytes(
            BUS_SETTINGS.encode() + SETTINGS_SYSTEMD_REFUSES[0]
        )
        status, lines, _ = container.start_service()
        result = container.systemctl("show", "--property=Result", "--value", "kamstrup")
        code = container.systemctl("show", "--property=ExecMainStatus", "--value", "kamstrup")
        hand = container.run("kamstrup-textfile", "--once", check=False)
        after = textfile_state(container)
    assert (status, result, code) == (1, "exit-code", "2"), lines
    assert len(lines) == 1 and "/etc/default/kamstrup" in lines[0], lines
    assert (hand.returncode, hand.stdout) == (2, ""), hand.stderr
    assert len(hand.stderr.splitlines()) == 1, hand.stderr
    assert "/etc/default/kamstrup" in hand.stderr, hand.stderr
    assert after == before


# --------------------------------------------------------------------------
# kamstrup-textfile --setup (issue 18): the first hour on a fresh install

# udev's name for the FTDI adapter of 10-usbports.rules' example (made by hand here:
# no udev in the container)
BY_ID = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"


def test_setup_finds_the_meters_and_the_service_reads_them(container, settings):
    """The simulated bus behind a /dev/serial/by-id link (the only adapter): `--setup
    --yes` as root finds both meters, writes /etc/default/kamstrup naming the link (a pty
    is no device udev knows, so no rule) and both meters, and starts the service once;
    then `systemctl start kamstrup.service` reads every meter. (A second run, the faults
    and the rule for a real adapter: tests/test_setup.py.)"""
    container.run("rm", "-f", "/etc/default/kamstrup.orig", TEXTFILE)
    with container.meter(meters=BUS_METERS) as device:
        container.run("rm", "-f", PORT)  # meter()'s link: the adapter is the by-id one
        container.run("mkdir", "-p", "/dev/serial/by-id")
        container.run("ln", "-sfn", device, BY_ID)
        try:
            setup = container.run("kamstrup-textfile", "--setup", "--yes", check=False, timeout=600)
            written = read_settings(container, ["/etc/default/kamstrup"])[0]
            container.run("rm", "-f", TEXTFILE)
            status, lines, text = container.start_service()
        finally:
            container.run("rm", "-rf", "/dev/serial", "/etc/default/kamstrup.orig")
    said = setup.stdout + setup.stderr
    assert setup.returncode == 0, said
    assert "kamstrup.service read every meter (2)" in setup.stdout, said
    assert "node_exporter serves the file" in setup.stdout, said
    assert not container.path("/etc/udev/rules.d/10-usbports.rules").exists()
    assert written["KAMSTRUP_PORT"] == BY_ID, written
    # by secondary address (the serial numbers): found by the secondary search
    assert sorted(written["KAMSTRUP_ADDRESS"].split()) == ["30303030", "77447744"], written
    assert (status, lines) == (0, []), lines
    meters = {dict(labels)["meter"]: value for labels, value in up(text).items()}
    assert meters == {"30303030": 1.0, "77447744": 1.0}, text


# --------------------------------------------------------------------------
# Prometheus


def shortened_rules(directory: Path) -> list[Path]:
    """Copies of the shipped rule files; in the copy KamstrupMeterNotRead waits 2 s."""
    alerts = (ROOT / "rules" / "kamstrup.rules.yml").read_text()
    short, n = re.subn(
        r"(- alert: KamstrupMeterNotRead\n(?:[^\n]*\n)*?\s+for: )30m\n", r"\g<1>2s\n", alerts
    )
    assert n == 1, "KamstrupMeterNotRead's `for: 30m` not found in rules/kamstrup.rules.yml"
    (directory / "kamstrup.rules.yml").write_text(short)
    shutil.copy(ROOT / "rules" / "kamstrup-legacy.rules.yml", directory)
    return [directory / "kamstrup.rules.yml", directory / "kamstrup-legacy.rules.yml"]


def query(container: Container, expr: str) -> list[dict]:
    body = json.loads(container.http_get(f"http://127.0.0.1:9090/api/v1/query?query={quote(expr)}"))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_records_legacy_names_and_alerts(container, tmp_path):
    prometheus = require_tool("prometheus")
    promtool = require_tool("promtool")
    rules = shortened_rules(tmp_path)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n" + "".join(f"  - {r}\n" for r in rules) + "scrape_configs:\n"
        "  - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:9100']\n"
    )
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr

    with container.meter():
        status, lines, _ = container.start_service()
    assert status == 0, lines

    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(
        [
            container.nsenter,
            "-t",
            str(container.leader),
            "-n",
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:9090",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def legacy():
            got = {}
            for result in query(container, '{__name__=~"kamstrum?p_.*", meter="30303030"}'):
                metric = dict(result["metric"])
                name = metric.pop("__name__")
                extra = tuple(sorted((k, v) for k, v in metric.items() if k == "type"))
                got[(name, extra)] = float(result["value"][1])
            return got if all(key in got for key in LEGACY) else None

        got = wait_until("the legacy recording rules in Prometheus", legacy, timeout=60)
        for key, value in LEGACY.items():
            assert got[key] == pytest.approx(value, rel=1e-9), key
        assert not query(container, 'ALERTS{alertname="KamstrupMeterNotRead"}')

        with container.meter("silent"):
            status, lines, _ = container.start_service()
        assert status != 0 and len(lines) == 1, lines

        def alert():
            found = query(container, 'ALERTS{alertname="KamstrupMeterNotRead"}')
            return [a["metric"] for a in found]

        alerts = wait_until("KamstrupMeterNotRead pending or firing", alert, timeout=60)
        assert [(a["address"], a["alertstate"] in ("pending", "firing")) for a in alerts] == [
            ("254", True)
        ], alerts
        # the meter's readings (and their legacy names) are gone with kamstrup_up 0
        wait_until(
            "the legacy series gone after the failed read",
            lambda: not query(container, "kamstrup_energy_kwh_total"),
            timeout=30,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    # the shipped rules were not touched
    assert "for: 30m" in (ROOT / "rules" / "kamstrup.rules.yml").read_text()


# --------------------------------------------------------------------------
# the udev rule (udev itself does not run in the container)
#
# systemd-nspawn mounts /sys read-only and starts no udevd, so no adapter and no
# /dev/serial/by-id link ever appears in the container, and the tests above make
# /dev/ttymeterBus themselves. What the rule does is checked with udev's own tools:
# `udevadm verify` (systemd 254 and later: Debian 13) reads the shipped example as a
# rules file, and `udevadm test` runs every rule of the release (60-serial.rules' by-id
# names and ours) against a made-up FTDI FT232R adapter in a fake sysfs, bound over
# /sys in a mount namespace of its own (SYSTEMD_DEVICE_VERIFY_SYSFS=0 lets udev read a
# sysfs that is not one), with tmpfs over /dev and /run so that nothing is made there.
# What this leaves to real hardware: the module's docstring.

UDEV_EXAMPLE = "/usr/share/doc/kamstrup-textfile/examples/10-usbports.rules"
# the adapter the shipped example names, and one that differs only in its serial number
ADAPTER_SERIAL = "A50285BI"
OTHER_SERIAL = "A9OTHER1"


def fake_sysfs(top: Path, serial: str) -> str:
    """A sysfs tree under `top` with one FTDI FT232R (0403:6001) USB serial adapter as
    the kernel shows it (USB device, interface, usb-serial port, tty); returns the tty's
    path as seen once `top` is bound over /sys."""
    usb = "devices/pci0000:00/0000:00:14.0/usb1/1-1"
    interface = f"{usb}/1-1:1.0"
    port = f"{interface}/ttyUSB0"
    tty = f"{port}/tty/ttyUSB0"
    files = {
        f"{usb}/uevent": "MAJOR=189\nMINOR=1\nDEVNAME=bus/usb/001/002\nDEVTYPE=usb_device\n"
        "DRIVER=usb\nPRODUCT=403/6001/600\nTYPE=0/0/0\nBUSNUM=001\nDEVNUM=002\n",
        f"{usb}/dev": "189:1\n",
        f"{usb}/idVendor": "0403\n",
        f"{usb}/idProduct": "6001\n",
        f"{usb}/serial": f"{serial}\n",
        f"{usb}/manufacturer": "FTDI\n",
        f"{usb}/product": "FT232R USB UART\n",
        f"{usb}/bcdDevice": "0600\n",
        f"{interface}/uevent": "DEVTYPE=usb_interface\nDRIVER=ftdi_sio\n"
        "PRODUCT=403/6001/600\nTYPE=0/0/0\nINTERFACE=255/255/255\n",
        f"{interface}/bInterfaceNumber": "00\n",
        f"{interface}/bInterfaceClass": "ff\n",
        f"{interface}/bInterfaceSubClass": "ff\n",
        f"{interface}/bInterfaceProtocol": "ff\n",
        f"{port}/uevent": "DRIVER=ftdi_sio\n",
        f"{port}/port_number": "0\n",
        f"{tty}/uevent": "MAJOR=188\nMINOR=0\nDEVNAME=ttyUSB0\n",
        f"{tty}/dev": "188:0\n",
    }
    for name, text in files.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_text(text)
    for name in ("bus/usb/drivers/usb", "bus/usb/drivers/ftdi_sio", "class/tty"):
        (top / name).mkdir(parents=True, exist_ok=True)
    (top / "bus/usb-serial/drivers/ftdi_sio").mkdir(parents=True, exist_ok=True)
    links = {
        f"{usb}/subsystem": "bus/usb",
        f"{usb}/driver": "bus/usb/drivers/usb",
        f"{interface}/subsystem": "bus/usb",
        f"{interface}/driver": "bus/usb/drivers/ftdi_sio",
        f"{port}/subsystem": "bus/usb-serial",
        f"{port}/driver": "bus/usb-serial/drivers/ftdi_sio",
        f"{tty}/subsystem": "class/tty",
        "class/tty/ttyUSB0": tty,
    }
    for name, target in links.items():
        (top / name).symlink_to(os.path.relpath(top / target, (top / name).parent))
    return f"/sys/{tty}"


def udev_test(container: Container, serial: str) -> tuple[set[str], str]:
    """`udevadm test` of the fake adapter with `serial`, with the shipped example
    installed as the README says: (its DEVLINKS, the whole output)."""
    fake = "/root/kamstrup-fake-sys"
    container.run("rm", "-rf", fake)
    device = fake_sysfs(container.path(fake), serial)
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs none /run; mount -t tmpfs none /dev; "
        f"mount --bind {fake} /sys; "
        f"exec env SYSTEMD_DEVICE_VERIFY_SYSFS=0 udevadm test --action=add {device}"
    )
    try:
        proc = container.run("unshare", "--mount", "sh", "-c", script, check=False)
    finally:
        container.run("rm", "-rf", fake)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    links = re.findall(r"^\s*DEVLINKS=(.*)$", out, re.M)
    assert len(links) <= 1, out[-3000:]
    return set(links[0].split()) if links else set(), out


@pytest.fixture
def udev_rule(container):
    """The shipped example installed in /etc/udev/rules.d (the README's step)."""
    container.run("install", "-m", "0644", UDEV_EXAMPLE, "/etc/udev/rules.d/")
    yield "/etc/udev/rules.d/10-usbports.rules"
    container.run("rm", "-f", "/etc/udev/rules.d/10-usbports.rules")


def test_udev_links_the_named_adapter_and_only_it(container, udev_rule):
    """udev's rules, the shipped one among them, give the adapter with the example's
    serial number /dev/ttymeterBus beside its by-id name; another FT232R only its
    by-id name (a different serial number)."""
    by_id = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_{}-if00-port0"
    links, out = udev_test(container, ADAPTER_SERIAL)
    assert f"Reading rules file: {udev_rule}" in out, out[-3000:]
    assert links == {PORT, by_id.format(ADAPTER_SERIAL)}, out[-3000:]
    # GROUP= and MODE= of the rule (the output says them on Debian 13 only)
    if container.suite != "bookworm":
        assert re.search(r"^Device node group:\n\s+dialout ", out, re.M), out[-3000:]
        assert re.search(r"^Device node permission:\n\s+0660$", out, re.M), out[-3000:]
    links, out = udev_test(container, OTHER_SERIAL)
    assert links == {by_id.format(OTHER_SERIAL)}, out[-3000:]


def udev_check(container: Container, path: str) -> tuple[bool, list[str]]:
    """(whether udev accepts the rules file at `path`, its complaints): `udevadm verify`
    where there is one (systemd 254+, Debian 13), else the messages `udevadm test` prints
    for that file while it reads every rules file (Debian 12)."""
    verify = container.run("udevadm", "verify", "--resolve-names=early", path, check=False)
    if container.suite != "bookworm":
        complaints = [line for line in verify.stderr.splitlines() if line.startswith(path)]
        return verify.returncode == 0, complaints
    assert "verify" in verify.stderr and verify.returncode != 0, verify.stderr  # not in 252
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs none /run; mount -t tmpfs none /dev; "
        "exec udevadm test --action=add /sys/class/net/lo"
    )
    proc = container.run("unshare", "--mount", "sh", "-c", script, check=False)
    out = proc.stdout + proc.stderr
    assert f"Reading rules file: {path}" in out, out[-3000:]
    complaints = [line for line in out.splitlines() if line.startswith(f"{path}:")]
    return not complaints, complaints


def test_udev_accepts_the_shipped_rule_and_refuses_a_broken_one(container, udev_rule):
    ok, complaints = udev_check(container, udev_rule)
    assert (ok, complaints) == (True, [])
    shipped = container.path(udev_rule).read_text()
    broken = shipped.replace('ATTRS{idVendor}=="', 'ATTRS{idVendor}="')
    assert broken != shipped
    container.path(udev_rule).write_text(broken)
    ok, complaints = udev_check(container, udev_rule)
    assert not ok and any("ATTRS" in line for line in complaints), complaints


# --------------------------------------------------------------------------
# remove and purge (last: it takes the package away)


def test_remove_stops_the_timer_and_purge_leaves_nothing(container):
    # the stamp the install's start left: with Persistent=true a quarter hour that passed
    # since then would start kamstrup.service at once, racing start_service() below
    container.run("rm", "-f", "/var/lib/systemd/timers/stamp-kamstrup.timer")
    container.run("systemctl", "start", "kamstrup.timer")
    assert container.systemctl("is-active", "kamstrup.timer") == "active"
    with container.meter():
        status, lines, _ = container.start_service()
    assert status == 0, lines
    assert container.path(TEXTFILE).exists()

    container.run("apt-get", "remove", "-y", PACKAGE)
    assert container.systemctl("is-active", "kamstrup.timer") == "inactive"
    assert not container.path("/lib/systemd/system/kamstrup.service").exists()
    assert container.path("/etc/default/kamstrup").exists()  # a conffile stays until purge

    container.run("apt-get", "purge", "-y", PACKAGE)
    leftovers = [
        str(p)
        for top in ("/etc", "/lib/systemd", "/usr/lib/systemd", "/usr/bin", "/var/lib/systemd")
        for p in container.path(top).rglob("*kamstrup*")
    ]
    assert leftovers == []
    assert not list(container.path("/usr/lib/python3/dist-packages").rglob("kamstrup*"))
    assert not container.path(TEXTFILE).exists()
    units = container.run("systemctl", "list-unit-files", "--no-legend", "kamstrup*", check=False)
    assert (units.returncode, units.stdout.strip()) == (1, ""), units.stdout
    # systemd 252 says nothing for a unit that is not there, 257 says so
    gone_unit = {"bookworm": "", "trixie": "not-found"}[container.suite]
    assert container.systemctl("is-enabled", "kamstrup.timer") == gone_unit
    gone = container.run("dpkg-query", "--show", PACKAGE, check=False)
    assert gone.returncode != 0
    # prometheus-node-exporter's directory is its own again, and still there
    assert container.path("/var/lib/prometheus/node-exporter").is_dir()
