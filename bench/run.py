#!/usr/bin/env python3
"""Benchmarks of kamstrup_textfile, side by side in one run; a Markdown table on stdout.

    python3 bench/run.py [--runs 5] [--quick] [--table 6 ...]

1. One read of the simulated MULTICAL 303 (142-byte answer) over a pseudo-terminal
   paced at 2400 baud 8E1 (11 bits a byte), answering after 50 ms: whole-process wall
   time of `kamstrup_textfile.py --once` against the wire floor, a minimal pyserial
   script (bench/minimal_read.py) and pyMeterBus 0.8.5 (bench/pymeterbus_read.py).
2. CPU (user+sys) and peak RSS of one `--once` run against
   `python3 -c "import click, serial"`.
3. Decoding throughput (decode + JSON) for the 303 answer (as sent, CI 0x72, and as its
   CI 0x76 twin, multi-byte fields most significant byte first) and the libmbus corpus,
   ours against pyMeterBus 0.8.5 (`meterbus.load` + `to_JSON`).
4. 1, 10 and 50 simulated meters on one bus, one of them silent.
5. Finding meters through the paced pty: `--scan` of 0-250 with one meter (at 133)
   against EN 13757-2's floor (251 x (SND_NKE on the wire + 330 bit times + 50 ms) +
   the found meter's read), and `--scan-secondary` of three meters on one primary
   address, two of them with ids one digit apart: wall time and selections.
6. One read through the optical eye (KMP) over a pty at 1200 baud, 11 bits a byte,
   answering after 50 ms: `kamstrup_textfile.py --once --protocol kmp` (its whole process,
   and the read alone: the .prom's kamstrup_read_duration_seconds) against the wire
   floor of the actual request and answer bytes (kamstrup_kmp's builders, stuffing
   included) and PyKMP 0.0.2 (bench/pykmp_read.py) asking for the same registers, with
   the requests each cost the meter (kamstrup_sim's count, as --requests writes it).

pyMeterBus is installed from PyPI into bench/.venv-pymeterbus and PyKMP into
bench/.venv-pykmp (it needs Python >= 3.10), never into the tool's own environment.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
sys.path.insert(0, str(TOP))

import kamstrup_kmp as kmp  # noqa: E402
import kamstrup_mbus as mbus  # noqa: E402
import kamstrup_sim as sim  # noqa: E402
import kamstrup_textfile as kt  # noqa: E402

BAUD = 2400
DELAY = 0.05
VENV = HERE / ".venv-pymeterbus"
VENV_PYKMP = HERE / ".venv-pykmp"
CORPUS = TOP / "tests" / "data" / "libmbus" / "test-frames"


def pymeterbus_python() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "pyMeterBus==0.8.5", "pyserial"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(
                f"pyMeterBus could not be installed: {done.stderr.strip()[-300:]}", file=sys.stderr
            )
            return None
    return str(python)


def pykmp_python() -> str | None:
    """The python of bench/.venv-pykmp with pykmp 0.0.2 (it needs Python >= 3.10), made
    if missing; None, said on stderr, if it cannot be.  The venv counts as made only
    once pykmp is in it: a half-made one (an interrupted or failed pip) is made anew."""
    python = VENV_PYKMP / "bin" / "python"
    ready = VENV_PYKMP / "pykmp-installed"
    if not ready.exists():
        base = sys.executable if sys.version_info >= (3, 10) else "/usr/bin/python3"
        subprocess.run([base, "-m", "venv", "--clear", str(VENV_PYKMP)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "pykmp[serial]==0.0.2"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"PyKMP could not be installed: {done.stderr.strip()[-300:]}", file=sys.stderr)
            return None
        ready.touch()
    return str(python)


# Byte code is cached as a pip install would (PYTHONDONTWRITEBYTECODE would hide that).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
GNU_TIME = "/usr/bin/time"  # Debian package "time": peak RSS of the command alone


def run_measured(cmd) -> tuple:
    """(wall seconds, user+sys seconds, peak RSS MiB, exit status) of one process.

    CPU comes from wait4; peak RSS from GNU time, because a child forked from this
    (large) process inherits its resident set until exec, which wait4 would report.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.Popen(
            wrapped, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        rss_kib = int(rss_file.read().split()[-1])
    code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, rss_kib / 1024, code


def on_meters(meters, cmd_for_port, runs: int) -> list:
    """Run a command ``runs`` times, each against a fresh pty with these meters."""
    results = []
    for _ in range(runs):
        line = sim.PtyLine(sim.SimulatedBus([sim.Meter(**m) for m in meters]), BAUD)
        try:
            results.append(run_measured(cmd_for_port(line.path)))
        finally:
            line.close()
    return results


def median(values) -> float:
    return statistics.median(values)


def one_read(runs: int, pmb: str | None) -> list:
    answer = sim.Meter().telegrams()[0]
    # paced by the simulator: E5 and the answer; both after the 50 ms answer delay
    floor = mbus.wire_seconds(1 + len(answer), BAUD) + 2 * DELAY
    meter = [{"address": 48, "delay": DELAY}]
    out = tempfile.mkdtemp()
    # the pty passes our 10 request bytes at once; on a real line they add 46 ms
    what = "wire floor (E5 + 142 bytes at 2400 8E1, 2 x 50 ms; requests not paced)"
    rows = [(what, floor, None, None)]
    cases = [
        (
            "kamstrup_textfile.py --once (script)",
            lambda p: [
                sys.executable,
                str(TOP / "kamstrup_textfile.py"),
                "--once",
                "--port",
                p,
                "--output",
                f"{out}/k.prom",
            ],  # fmt: skip
        ),
        (
            "kamstrup-textfile --once (module, byte code cached)",
            lambda p: [
                sys.executable,
                "-c",
                "import kamstrup_textfile as k; k.main()",
                "--once",
                "--port",
                p,
                "--output",
                f"{out}/k.prom",
            ],  # fmt: skip
        ),
        (
            "minimal pyserial script",
            lambda p: [sys.executable, str(HERE / "minimal_read.py"), p, "254"],
        ),
    ]
    if pmb:
        cases.append(
            ("pyMeterBus 0.8.5", lambda p: [pmb, str(HERE / "pymeterbus_read.py"), p, "254"])
        )
    for name, cmd in cases:
        results = on_meters(meter, cmd, runs)
        failed = [r for r in results if r[3] != 0]
        if failed:
            raise SystemExit(f"{name}: exit status {failed[0][3]}")
        rows.append((name, median(r[0] for r in results), median(r[1] for r in results),
                     median(r[2] for r in results)))  # fmt: skip
    return rows


def import_baseline(runs: int) -> tuple:
    results = [run_measured([sys.executable, "-c", "import click, serial"]) for _ in range(runs)]
    return median(r[1] for r in results), median(r[2] for r in results)


def decode_rate(frames, seconds: float) -> float:
    """Frames per second of decode_telegram + the JSON text the tool prints for them."""
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for frame in frames:
            kt.telegram_json(kt.decode_telegram(frame))
        count += len(frames)
    return count / (time.perf_counter() - start)


def read_hex(path: Path) -> bytes:
    return bytes.fromhex("".join(c for c in path.read_text("latin-1") if c in string.hexdigits))


def msb_twin(frame: bytes) -> bytes:
    """The same answer with CI 0x76: the header's identification, manufacturer and
    signature and every data field most significant byte first (fixed-length records)."""
    body = frame[7:-2]
    out = body[3::-1] + body[5:3:-1] + body[6:10] + body[11:9:-1]
    pos = 12
    for record in kt.decode_telegram(frame).records:
        head = len(record.dib) + len(record.vib)
        length = kt._DATA_LENGTHS[record.dib[0] & 0x0F]
        out += body[pos : pos + head] + body[pos + head : pos + head + length][::-1]
        pos += head + length
    assert pos == len(body)
    return mbus.long_frame(frame[4], frame[5], 0x76, out)


def throughput(seconds: float, pmb: str | None) -> list:
    """(name, frames, ours on all, pyMeterBus, ours on the frames pyMeterBus decodes, usable)."""
    folder = Path(tempfile.mkdtemp())
    answer = sim.Meter().telegrams()[0]
    answer_path = folder / "multical303.hex"
    answer_path.write_text(answer.hex(" "))
    twin_path = folder / "multical303_ci76.hex"
    twin_path.write_text(msb_twin(answer).hex(" "))
    corpus = sorted(CORPUS.glob("*.hex"))
    rows = []
    cases = (
        ("MULTICAL 303 answer", [answer_path]),
        ("MULTICAL 303 answer as CI 0x76", [twin_path]),
        ("libmbus corpus", corpus),
    )
    for name, paths in cases:
        frames = [read_hex(p) for p in paths]
        ours = decode_rate(frames, seconds)
        theirs = same = usable = None
        if pmb:
            done = subprocess.run(
                [pmb, str(HERE / "pymeterbus_read.py"), "--decode", str(seconds)]
                + [str(p) for p in paths],
                capture_output=True,
                text=True,
                check=True,
            )
            rate, count, total, *indices = done.stdout.split()
            theirs = float(rate)
            usable = f"{count}/{total}"
            chosen = [frames[int(i)] for i in indices[0].split(",")] if indices else []
            same = decode_rate(chosen, seconds) if chosen else None
        rows.append((name, len(frames), ours, theirs, same, usable))
    return rows


def many_meters(counts, runs: int) -> list:
    rows = []
    answer = sim.Meter().telegrams()[0]
    per_meter = mbus.wire_seconds(1 + len(answer), BAUD) + 2 * DELAY
    timeout, retries = 1.0, 2
    for n in counts:
        meters = [{"address": a, "ident": f"{a:08d}", "delay": DELAY} for a in range(1, n + 1)]
        meters[-1]["silent"] = True
        addresses = [str(m["address"]) for m in meters]
        out = tempfile.mkdtemp()

        def cmd(port, addresses=addresses, out=out):
            return [sys.executable, "-c", "import kamstrup_textfile as k; k.main()", "--once",
                    "--port", port, "--output", f"{out}/k.prom",
                    "--timeout", str(timeout), "--retries", str(retries),
                    *[x for a in addresses for x in ("--address", a)]]  # fmt: skip

        results = on_meters(meters, cmd, runs)
        wall = median(r[0] for r in results)
        # SND_NKE windows (counted from the end of the request and its answer's first byte)
        # and the quiet line before each retry
        window = mbus.wire_seconds(5 + 1, BAUD) + timeout
        silent_budget = (1 + retries) * window + retries * 0.1
        floor = (n - 1) * per_meter + silent_budget
        rows.append((n, wall, (n - 1) * per_meter, silent_budget, floor))
    return rows


def scans(rates, secondary_only: bool) -> list:
    """(what, rate, wall s, floor s, selections) of the scans through a paced pty."""
    rows = []
    answer = sim.Meter().telegrams()[0]
    for rate in rates:
        probe = mbus.wire_seconds(5, rate) + mbus.slowest_answer(rate)
        read = 0.1 + mbus.wire_seconds(5 + len(answer), rate) + DELAY  # quiet, REQ_UD2, answer
        if not secondary_only:
            meters = [sim.Meter(address=133, ident="82937133", baudrate=rate, delay=DELAY)]
            wall, _ = _scan_wall(meters, rate, "--scan")
            rows.append(("--scan 0-250, one meter", rate, wall, 251 * probe + read, None))
        idents = ("82937133", "82937134", "71234567")
        meters = [sim.Meter(address=0, ident=i, baudrate=rate, delay=DELAY) for i in idents]
        wall, stderr = _scan_wall(meters, rate, "--scan-secondary")
        selections = int(stderr.split("secondary search at")[1].split(":")[1].split()[0])
        select = mbus.wire_seconds(17, rate) + mbus.slowest_answer(rate)
        floor = selections * select + 3 * read
        rows.append(("--scan-secondary, 3 meters", rate, wall, floor, selections))
    return rows


def _scan_wall(meters, rate, mode) -> tuple:
    line = sim.PtyLine(sim.SimulatedBus(meters), BAUD)
    try:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", "import kamstrup_textfile as k; k.main()", mode,
             "--port", line.path, "--baudrate", str(rate), "-v"],
            cwd=TOP, env=ENV, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.monotonic() - start
    finally:
        line.close()
    if done.returncode != 0:
        raise SystemExit(f"{mode} at {rate} baud failed: {done.stderr[-500:]}")
    return wall, done.stderr


KMP_METER = "303::30303030"  # kamstrup-sim --protocol kmp's default meter, no echo


def kmp_exchanges(meter) -> list:
    """(request, answer) bytes of one read of ``meter``, built with kamstrup_kmp's own
    request and answer builders (stuffing included) and checked against the meter's."""
    pairs = []
    for ids in kmp.read_plan():
        request = kmp.get_register_request(ids)
        data = kmp.register_data(meter.registers(ids), meter.length)
        answer = kmp.answer_frame(kmp.CID_GET_REGISTER, data)
        assert answer == meter.answer(request), "the simulated meter answers otherwise"
        pairs.append((request, answer))
    return pairs


def _timed(cmd, env) -> tuple:
    """(wall seconds, stdout) of one process; its failure ends the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[1]}: exit status {done.returncode}: {done.stderr[-500:]}")
    return wall, done.stdout


def kmp_read(runs: int, pykmp: str | None) -> list:
    """(what, wall s, read s, requests) rows; wall and read are None for the floors."""
    meter = sim._parse_kmp_meter(KMP_METER)
    pairs = kmp_exchanges(sim._parse_kmp_meter(KMP_METER))
    asked = sum(len(q) for q, _ in pairs)
    answered = sum(len(a) for _, a in pairs)
    delays = len(pairs) * meter.delay
    sizes = " + ".join(f"{len(q)}/{len(a)}" for q, a in pairs)
    wire = kmp.wire_seconds(asked + answered) + delays
    rows = [
        (f"wire floor: requests/answers {sizes} bytes at 1200 baud 11 bits, "
         f"{len(pairs)} x {meter.delay * 1000:.0f} ms", None, wire, len(pairs)),
    ]  # fmt: skip
    env = dict(ENV, KAMSTRUP_CONFIG="")  # no settings file's meters or output
    out = tempfile.mkdtemp()
    batches = [",".join(map(str, ids)) for ids in kmp.read_plan()]
    cases = [(
        "kamstrup_textfile.py --once --protocol kmp",
        lambda p: [sys.executable, str(TOP / "kamstrup_textfile.py"), "--once", "--protocol",
                   "kmp", "--baudrate", "1200", "--port", p, "--output", f"{out}/k.prom"],
        lambda stdout: _read_duration(Path(out) / "k.prom"),
    )]  # fmt: skip
    if pykmp:
        cases.append((
            "PyKMP 0.0.2, GetRegister of the same 8 + 2 registers",
            lambda p: [pykmp, str(HERE / "pykmp_read.py"), p, *batches],
            lambda stdout: float(stdout.split()[0]),
        ))  # fmt: skip
    for name, cmd, read_of in cases:
        walls, reads, requests = [], [], set()
        for _ in range(runs):
            meter = sim._parse_kmp_meter(KMP_METER)
            line = sim.PtyLine(meter, kmp.BAUDRATE)
            try:
                wall, stdout = _timed(cmd(line.path), env)
            finally:
                line.close()
            walls.append(wall)
            reads.append(read_of(stdout))
            requests.add(sim.requests_heard(meter))  # what --requests FILE writes
        rows.append((name, median(walls), median(reads), "/".join(map(str, sorted(requests)))))
    return rows


def _read_duration(prom: Path) -> float:
    for line in prom.read_text().splitlines():
        if line.startswith("kamstrup_read_duration_seconds{"):
            return float(line.split()[-1])
    raise SystemExit(f"{prom}: no kamstrup_read_duration_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--quick", action="store_true", help="1 run each, 1 and 3 meters")
    parser.add_argument(
        "--without-pymeterbus", action="store_true", help="skip the pyMeterBus columns"
    )
    parser.add_argument("--without-pykmp", action="store_true", help="skip PyKMP's row")
    parser.add_argument("--table", type=int, action="append", choices=range(1, 7),
                        help="run only this table (repeat for more); default all")  # fmt: skip
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    tables = set(args.table or range(1, 7))
    if not os.access(GNU_TIME, os.X_OK) and tables & {1, 2}:
        raise SystemExit(f"{GNU_TIME} is missing: apt-get install time")
    pmb = None if args.without_pymeterbus or not tables & {1, 3} else pymeterbus_python()
    pykmp = None if args.without_pykmp or 6 not in tables else pykmp_python()
    subprocess.run([sys.executable, "-c", "import kamstrup_textfile"], cwd=TOP, env=ENV, check=True)

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.platform()}\n")  # fmt: skip
    if tables & {1, 2}:
        rows = one_read(runs, pmb)
    if 1 in tables:
        table_1(rows, runs)
    if 2 in tables:
        table_2(rows, runs)
    if 3 in tables:
        table_3(args.seconds, pmb)
    if 4 in tables:
        table_4(args.quick)
    if 5 in tables:
        table_5(args.quick)
    if 6 in tables:
        table_6(runs, pykmp)


def table_1(rows, runs: int) -> None:
    print(f"## 1. One read over a pty at 2400 baud, median of {runs}\n")
    print(
        "| what | wall s | vs minimal | CPU s | peak RSS MiB |\n| --- | ---: | ---: | ---: | ---: |"
    )
    minimal = next(r[1] for r in rows if r[0].startswith("minimal"))
    for name, wall, cpu, rss in rows:
        cpu_text = "" if cpu is None else f"{cpu:.3f}"
        rss_text = "" if rss is None else f"{rss:.1f}"
        print(f"| {name} | {wall:.3f} | {wall / minimal:.2f}x | {cpu_text} | {rss_text} |")


def table_2(rows, runs: int) -> None:
    print(f"\n## 2. CPU and memory of one run, median of {runs}\n")
    base_cpu, base_rss = import_baseline(max(runs, 5))
    ours = next(r for r in rows if r[0].startswith("kamstrup-textfile"))
    print("| what | user+sys s | peak RSS MiB |\n| --- | ---: | ---: |")
    print(f'| python3 -c "import click, serial" | {base_cpu:.3f} | {base_rss:.1f} |')
    print(f"| kamstrup-textfile --once | {ours[2]:.3f} ({ours[2] / base_cpu:.2f}x) | "
          f"{ours[3]:.1f} ({ours[3] / base_rss:.2f}x) |")  # fmt: skip


def table_3(seconds: float, pmb: str | None) -> None:
    print(f"\n## 3. Decoding throughput (decode + JSON), {seconds:g} s each\n")
    print(
        "| frames | n | ours, all frames/s | pyMeterBus frames/s | ours on the same frames/s "
        "| ratio | pyMeterBus decodes |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, ours_rate, theirs, same, usable in throughput(seconds, pmb):
        ratio = f"{same / theirs:.1f}x" if theirs and same else "n/a"
        theirs_text = f"{theirs:,.0f}" if theirs else "n/a"
        same_text = f"{same:,.0f}" if same else "n/a"
        print(
            f"| {name} | {n} | {ours_rate:,.0f} | {theirs_text} | {same_text} | {ratio} "
            f"| {usable or 'n/a'} |"
        )


def table_4(quick: bool) -> None:
    counts = (1, 3) if quick else (1, 10, 50)
    print("\n## 4. Many meters on one bus, the last one silent (timeout 1 s, 2 retries)\n")
    print("| meters | wall s | wire time of the others s | silent meter's deadlines s | "
          "floor s | wall - floor s |\n| ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for n, wall, wire, silent, floor in many_meters(counts, 1):
        print(
            f"| {n} | {wall:.2f} | {wire:.2f} | {silent:.2f} | {floor:.2f} | {wall - floor:.2f} |"
        )


def table_5(quick: bool) -> None:
    print("\n## 5. Finding meters through the pty, one run each\n")
    print("| what | baud | wall s | floor s | wall / floor | selections |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for what, rate, wall, floor, selections in scans((9600,) if quick else (2400, 9600),
                                                    secondary_only=quick):  # fmt: skip
        print(f"| {what} | {rate} | {wall:.1f} | {floor:.1f} | {wall / floor:.2f}x | "
              f"{selections if selections is not None else ''} |")  # fmt: skip


def table_6(runs: int, pykmp: str | None) -> None:
    print(f"\n## 6. One read through the optical eye (KMP) over a pty at 1200 baud, "
          f"median of {runs}\n")  # fmt: skip
    rows = kmp_read(runs, pykmp)
    wire = rows[0][2]
    print("| what | wall s | read s | read / wire floor | requests |\n"
          "| --- | ---: | ---: | ---: | ---: |")  # fmt: skip
    for name, wall, read, requests in rows:
        wall_text = "" if wall is None else f"{wall:.3f}"
        print(f"| {name} | {wall_text} | {read:.3f} | {read / wire:.2f}x | {requests} |")
    print("\nread s: from opening the port to the last answer (kamstrup_textfile: the .prom's "
          "kamstrup_read_duration_seconds; PyKMP: timed in bench/pykmp_read.py), without "
          "Python's start-up, which wall s includes.")  # fmt: skip


if __name__ == "__main__":
    main()
