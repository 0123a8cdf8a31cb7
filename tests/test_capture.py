"""--capture FILE: every answer of a live read appended to FILE as hex, each after a comment
line; --decode FILE gives back the .prom / JSON the live read gave.

In-process against kamstrup_sim's FakePort where that is enough, and the round trip as a
user runs it: two processes and a pseudo-terminal paced at 2400 baud.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from test_sim_paths import stable

import kamstrup_sim as sim
import kamstrup_textfile as kt

try:
    from tools import invoke, run_tool, up_line
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import invoke, run_tool, up_line

COMMENT = re.compile(
    r"# (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d) port (\S+) address (\S+) baudrate (\d+)"
)


REJECTED = re.compile(COMMENT.pattern + r" rejected: (.+)")
REJECTED_BYTES = re.compile(r"# ([0-9A-F]{2}( [0-9A-F]{2})*)")


def rejected(path: Path) -> list:
    """[(comment match, bytes)] of the answers the bus refused, kept as comment lines."""
    lines = path.read_text(encoding="ascii").splitlines()
    out = []
    for i, line in enumerate(lines):
        match = REJECTED.fullmatch(line)
        if match:
            data = REJECTED_BYTES.fullmatch(lines[i + 1])
            assert data, lines[i + 1]
            out.append((match, bytes.fromhex(data.group(1))))
    return out


def entries(path: Path) -> list:
    """[(comment match, frame bytes)] of a capture file's answers: every line is a comment
    or a frame, and each frame follows its comment (rejected answers left out)."""
    lines, kept = path.read_text(encoding="ascii").splitlines(), []
    while lines:
        line = lines.pop(0)
        if REJECTED.fullmatch(line):
            lines.pop(0)  # its bytes
        else:
            kept.append(line)
    lines = kept
    assert len(lines) % 2 == 0, lines
    out = []
    for comment, frame in zip(lines[::2], lines[1::2]):
        match = COMMENT.fullmatch(comment)
        assert match, comment
        assert re.fullmatch(r"[0-9A-F]{2}( [0-9A-F]{2})*", frame), frame
        out.append((match, bytes.fromhex(frame)))
    return out


# --- what a capture holds -------------------------------------------------------------


def test_capture_file_layout(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48))
    capture = tmp_path / "frames.hex"
    before = dt.datetime.now().astimezone().replace(microsecond=0)
    result = invoke(["--once", "--port", "/dev/ttymeterBus", "--address", "48",
                     "--output", str(tmp_path / "k.prom"), "--capture", str(capture)])  # fmt: skip
    after = dt.datetime.now().astimezone()
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    ((comment, frame),) = entries(capture)
    when = dt.datetime.fromisoformat(comment.group(1))
    assert when.utcoffset() is not None  # local time with its offset
    assert before <= when <= after
    assert comment.group(2, 3, 4) == ("/dev/ttymeterBus", "48", "2400")
    assert frame == sim.Meter(address=48).telegrams()[0]


def test_every_answer_of_every_meter_in_order(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48, multi=True))  # two telegrams
    fake_bus.append(sim.Meter(address=74, ident="77447744", kind="403"))
    capture = tmp_path / "frames.hex"
    args = ["--once", "--address", "48", "--address", "74", "--baudrate", "9600"]
    result = invoke([*args, "--output", "-", "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    got = entries(capture)
    assert [(c.group(3), c.group(4)) for c, _ in got] == [("48", "9600")] * 2 + [("74", "9600")]
    assert [f for _, f in got] == sim.Meter(address=48, multi=True).telegrams() + [
        sim.Meter(address=74, ident="77447744", kind="403").telegrams()[0]
    ]


def test_a_capture_is_appended_to(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48))
    capture = tmp_path / "frames.hex"
    capture.write_text("# kept\n")
    for _ in range(2):
        result = invoke(["--once", "--address", "48", "--output", "-", "--capture", str(capture)])
        assert result.exit_code == 0, result.stderr
    text = capture.read_text()
    assert text.startswith("# kept\n")
    assert text.count("\n68 88 88 68 08 30 72") == 2


def test_a_silent_meter_leaves_nothing_and_the_others_are_kept(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48))
    capture = tmp_path / "frames.hex"
    args = ["--once", "--address", "5", "--address", "48", "--timeout", "0.05", "--retries", "0"]
    result = invoke([*args, "--output", "-", "--capture", str(capture)])
    assert result.exit_code == 1  # address 5 failed, as without --capture
    assert [c.group(3) for c, _ in entries(capture)] == ["48"]


def test_a_refused_answer_is_kept_as_comments_with_its_reason(fake_bus, tmp_path):
    """The answers a maintainer most wants: the one that failed its checksum is in the
    capture (as comment lines, with why), the retry's good answer after it."""
    fake_bus.append(sim.Meter(address=48, corrupt=frozenset({1})))
    capture = tmp_path / "frames.hex"
    live = tmp_path / "kamstrup.prom"  # bus "kamstrup", as a --decode's default
    result = invoke(["--once", "--address", "48", "--output", str(live), "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    good = sim.Meter(address=48).telegrams()[0]
    ((comment, data),) = rejected(capture)
    assert comment.group(3, 4) == ("48", "2400")
    assert "checksum" in comment.group(5)
    assert data == good[:-2] + bytes(((good[-2] + 1) & 0xFF, 0x16))
    assert [f for _, f in entries(capture)] == [good]
    lines = capture.read_text().splitlines()
    assert REJECTED.fullmatch(lines[0]) and lines[3] == good.hex(" ").upper()
    decoded = invoke(["--decode", str(capture)])
    assert decoded.exit_code == 0, decoded.stderr
    assert stable(decoded.stdout) == stable(live.read_text())


def test_a_cut_off_answer_is_kept_at_each_try(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48, truncate=20))
    capture = tmp_path / "frames.hex"
    args = ["--once", "--address", "48", "--retries", "1", "--output", "-"]
    result = invoke([*args, "--capture", str(capture)])
    assert result.exit_code == 1
    got = rejected(capture)
    assert len(got) == 2  # the first try and the retry
    assert all(data == sim.Meter(address=48).telegrams()[0][:20] for _, data in got)
    assert all(c.group(5) == "answer cut off after 20 of 142 bytes" for c, _ in got), got
    assert entries(capture) == []
    decoded = invoke(["--decode", str(capture)])  # nothing but refused answers in it
    assert decoded.exit_code == 1
    assert decoded.stderr.splitlines() == [
        f"kamstrup-textfile: {capture}: no frame, only comment lines (a capture keeps "
        "refused answers as comments)"
    ]


class Misaddressed(sim.Meter):
    """Answers REQ_UD2 to its address with another address in the frame (a second meter
    on the same address whose answer won, or a meter that misreports its address)."""

    def telegrams(self) -> list:
        return [sim.rewrite(t, address=49) for t in super().telegrams()]


def test_an_answer_from_the_wrong_address_is_kept_but_not_decoded(fake_bus, tmp_path):
    fake_bus.append(Misaddressed(address=48))
    capture = tmp_path / "frames.hex"
    args = ["--once", "--address", "48", "--retries", "0", "--output", "-"]
    result = invoke([*args, "--capture", str(capture)])
    assert result.exit_code == 1
    assert "answer from address 49, not 48" in result.stderr
    ((comment, data),) = rejected(capture)
    assert comment.group(5) == "answer from address 49, not 48"
    assert kt.decode_telegram(data).address == 49
    assert entries(capture) == []  # --decode would label it as a meter at 49: not an answer


def test_secondary_address_in_the_comment(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48, ident="82937133"))
    capture = tmp_path / "frames.hex"
    result = invoke(["--once", "--address", "82937133", "--output", "-", "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    ((comment, frame),) = entries(capture)
    assert comment.group(3) == "82937133"
    assert kt.decode_telegram(frame).id == "82937133"


# --- --decode reads it back ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["prom", "json"])
def test_decode_gives_what_the_live_read_gave(fake_bus, tmp_path, fmt):
    fake_bus.append(sim.Meter(address=48, multi=True))
    fake_bus.append(sim.Meter(address=74, ident="77447744", kind="403"))
    capture = tmp_path / "frames.hex"
    live = tmp_path / f"kamstrup.{fmt}"  # for prom, bus "kamstrup", as a --decode's default
    args = ["--once", "--address", "48", "--address", "74", "--format", fmt]
    result = invoke([*args, "--output", str(live), "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    decoded = invoke(["--decode", str(capture), "--format", fmt])
    assert decoded.exit_code == 0, decoded.stderr
    if fmt == "json":
        assert json.loads(decoded.stdout) == json.loads(live.read_text())
    else:
        assert stable(decoded.stdout) == stable(live.read_text())
        assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000' in decoded.stdout


def test_comment_lines_are_ignored_by_decode():
    frame = sim.Meter(address=48).telegrams()[0].hex(" ")
    text = f"# a comment\n\n  # indented, 68 with hex-looking words: FF\n{frame}\n# end\n"
    assert kt.parse_hex(text) == bytes.fromhex(frame)
    with pytest.raises(kt.FrameError, match="line 2: 'x' is not a hex digit"):
        kt.parse_hex("# fine\n68 x\n")


# --- what goes wrong -------------------------------------------------------------------


def test_unwritable_capture_warns_and_keeps_the_prom(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    capture = tmp_path / "missing-dir" / "frames.hex"
    result = invoke(["--once", "--address", "48", "--output", str(out), "--capture", str(capture)])
    assert result.exit_code == 1  # the capture asked for did not happen
    lines = result.stderr.splitlines()
    assert lines == [
        f"kamstrup-textfile: capture {capture}: No such file or directory; "
        "the read goes on without it"
    ]
    text = out.read_text()
    assert up_line(48, 1, bus="k", meter="30303030") in text
    assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n' in text
    assert not capture.exists()


def test_capture_write_failure_midway(fake_bus, tmp_path):
    """/dev/full: opening works, every write fails (ENOSPC), as on a full disk."""
    fake_bus.append(sim.Meter(address=48, multi=True))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--address", "48", "--output", str(out), "--capture", "/dev/full"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "kamstrup-textfile: capture /dev/full: No space left on device; the read goes on without it"
    ]  # one line, although two answers were not written
    assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n' in out.read_text()


CAPTURE_USAGE_ERRORS = {
    "with_decode": ["--decode", "-", "--capture", "{tmp}/frames.hex"],
    "with_scan": ["--scan", "--capture", "{tmp}/frames.hex"],
    "same_as_output": ["--once", "--output", "{tmp}/k.prom", "--capture", "{tmp}/k.prom"],
    "a_prom_file": ["--once", "--output", "-", "--capture", "{tmp}/frames.prom"],
    "stdout": ["--once", "--output", "-", "--capture", "-"],
}


@pytest.mark.parametrize("kind", sorted(CAPTURE_USAGE_ERRORS))
def test_capture_usage_errors(kind, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: opened.append(a))
    args = [a.replace("{tmp}", str(tmp_path)) for a in CAPTURE_USAGE_ERRORS[kind]]
    result = invoke(args, input="")
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "--capture" in result.stderr
    assert opened == []
    assert list(tmp_path.iterdir()) == []


def test_capture_through_the_same_path_as_output_via_a_link(tmp_path, monkeypatch):
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: pytest.fail("port opened"))
    (tmp_path / "k.prom").write_text("")
    (tmp_path / "link.hex").symlink_to(tmp_path / "k.prom")
    args = ["--once", "--output", str(tmp_path / "k.prom"), "--capture", str(tmp_path / "link.hex")]
    result = invoke(args)
    assert result.exit_code == 2
    assert (tmp_path / "k.prom").read_text() == ""


# --- the round trip as a user runs it: a paced pty, two processes --------------------------


@pytest.mark.slow
def test_round_trip_through_a_pty(tmp_path):
    live = {}
    for fmt in ("prom", "json"):
        meters = [  # the second telegram's first answer fails its checksum: kept, refused
            sim.Meter(address=48, multi=True, corrupt=frozenset({2})),
            sim.Meter(address=74, ident="77447744", kind="403"),
        ]
        line = sim.PtyLine(sim.SimulatedBus(meters), baudrate=2400, pace=True)
        out = tmp_path / f"kamstrup.{fmt}"  # for prom, bus "kamstrup", as a --decode's default
        try:
            result = run_tool("--once", "--port", line.path, "--address", "48", "--address", "74",
                              "--format", fmt, "--output", str(out),
                              "--capture", str(tmp_path / f"{fmt}.hex"))  # fmt: skip
        finally:
            line.close()
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        live[fmt] = out.read_text()
        decoded = run_tool("--decode", str(tmp_path / f"{fmt}.hex"), "--format", fmt)
        assert decoded.returncode == 0, decoded.stderr
        if fmt == "json":
            assert json.loads(decoded.stdout) == json.loads(live[fmt])
        else:
            assert stable(decoded.stdout) == stable(live[fmt])
        ports = {c.group(2) for c, _ in entries(tmp_path / f"{fmt}.hex")}
        assert ports == {line.path}
        ((comment, data),) = rejected(tmp_path / f"{fmt}.hex")
        assert comment.group(2, 3) == (line.path, "48") and "checksum" in comment.group(5)
        assert data[:-2] == sim.Meter(address=48, multi=True).telegrams()[1][:-2]
    assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n' in live["prom"]


def test_capture_from_the_environment(fake_bus, tmp_path):
    fake_bus.append(sim.Meter(address=48))
    capture = tmp_path / "frames.hex"
    result = invoke(["--once", "--address", "48", "--output", "-"],
                    env={"KAMSTRUP_CAPTURE": str(capture)})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(entries(capture)) == 1


def test_a_ci_0x76_meter_read_live_captured_and_decoded(fake_bus, tmp_path, monkeypatch):
    """The Apator ELF's CI 0x76 answer (tests/data/frames) from a simulated meter: read
    live like any other, captured, and decoded back to the same file."""
    frames = Path(__file__).resolve().parent / "data" / "frames"
    monkeypatch.setitem(sim.FRAMES, "apator-ci76", (frames / "apator_elf_ci76.hex").read_text())
    # the simulator writes the identification least significant byte first: reversed here
    fake_bus.append(sim.Meter(address=1, ident="55916100", kind="apator-ci76"))
    capture = tmp_path / "frames.hex"
    live = tmp_path / "kamstrup.prom"  # bus "kamstrup", as a --decode's default
    result = invoke(["--once", "--address", "1", "--output", str(live), "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    text = live.read_text()
    assert 'kamstrup_temperature_celsius{meter="00619155",sensor="flow"} 26.9\n' in text
    ((_, frame),) = entries(capture)
    assert frame[6] == 0x76
    decoded = invoke(["--decode", str(capture)])
    assert stable(decoded.stdout) == stable(text)


# --- which bytes a refused answer keeps (Bus.on_refused, in-process) ----------------------


def bus_with(meters, echo=False, retries=0):
    port = sim.FakePort(sim.SimulatedBus(meters, echo=echo), timeout=0.001)
    bus = kt.Bus(port, baudrate=2400, timeout=0.3, retries=retries)
    got = []
    bus.on_refused = lambda *a: got.append(a)
    return bus, got


def test_an_echo_is_not_part_of_the_refused_bytes():
    bus, got = bus_with([sim.Meter(address=48, bad_checksum=True)], echo=True)
    with pytest.raises(kt.BusError):
        bus.read(48)
    good = sim.Meter(address=48).telegrams()[0]
    ((address, data, rate, why),) = got
    assert (address, rate) == (48, 2400) and "checksum" in why
    assert data[:-2] == good[:-2], data[:8].hex(" ")  # not the echoed 10 7B 30 AB 16 first


class OtherId(sim.Meter):
    """Selected by its own id, answers with another one in the frame."""

    def telegrams(self) -> list:
        return [sim.rewrite(t, ident="99999999") for t in super().telegrams()]


def test_a_refused_secondary_answer_names_the_secondary_address():
    bus, got = bus_with([OtherId(address=48, ident="12345678")])
    with pytest.raises(kt.BusError):
        bus.read("12345678")
    ((address, data, _, why),) = got
    assert address == "12345678" and why == "answer from meter 99999999, not 12345678"
    assert kt.decode_telegram(data).id == "99999999"


def test_a_refused_second_telegram_holds_only_its_own_bytes():
    bus, got = bus_with([sim.Meter(address=48, multi=True, corrupt=frozenset({2}))], retries=1)
    bus.read(48)
    ((_, data, _, _),) = got
    assert data[:-2] == sim.Meter(address=48, multi=True).telegrams()[1][:-2]


@pytest.mark.parametrize("port", ["/dev/zähler", "/dev/tty\rUSB0", "/dev/tty\x1cUSB0"])
def test_a_port_name_that_is_not_ascii_or_breaks_lines_is_one_comment(fake_bus, tmp_path, port):
    """A udev link named in the user's language: no UnicodeEncodeError mid-read (a
    traceback, no .prom); a name with a line break in it stays on its comment line."""
    fake_bus.append(sim.Meter(address=48, corrupt=frozenset({1})))
    capture = tmp_path / "frames.hex"
    live = tmp_path / "kamstrup.prom"  # bus "kamstrup", as a --decode's default
    result = invoke(["--once", "--port", port, "--address", "48", "--output", str(live),
                     "--capture", str(capture)])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert up_line(48, 1, meter="30303030") in live.read_text()
    lines = capture.read_bytes().decode("ascii").splitlines()
    assert len(lines) == 4 and lines[0].startswith("# ") and lines[2].startswith("# ")
    decoded = invoke(["--decode", str(capture)])
    assert decoded.exit_code == 0, decoded.stderr
    assert stable(decoded.stdout) == stable(live.read_text())


# --- --decode gives the live read's verdict, not only its frames ---------------------------


@pytest.mark.parametrize(
    "meter, why",
    [
        (sim.Meter(address=48, multi=True, ignore_fcb=True), "ignores the FCB"),
        (sim.Meter(address=48, endless=True), "the meter would never stop"),
    ],
)
def test_a_read_that_failed_on_its_chain_of_telegrams_decodes_as_failed(
    fake_bus, tmp_path, meter, why
):
    """Every telegram was an answer (captured), the chain was not: a telegram that
    repeats the one before, a meter that never stops.  The decode says so too."""
    fake_bus.append(meter)
    capture = tmp_path / "frames.hex"
    live = tmp_path / "kamstrup.prom"  # bus "kamstrup", as a --decode's default
    result = invoke(["--once", "--address", "48", "--output", str(live), "--capture", str(capture)])
    assert result.exit_code == 1 and why in result.stderr
    assert up_line(48, 0) in live.read_text()
    decoded = invoke(["--decode", str(capture)])
    assert decoded.exit_code == 1
    assert why in decoded.stderr
    assert up_line(48, 0) in decoded.stdout
    assert "kamstrup_energy_joules_total" not in decoded.stdout


def test_decode_writes_stdout_whatever_kamstrup_output_says(fake_bus, tmp_path):
    """KAMSTRUP_OUTPUT from a sourced /etc/default/kamstrup must not let an old capture
    replace the live file with readings that look fresh: only --output does."""
    fake_bus.append(sim.Meter(address=48))
    capture = tmp_path / "frames.hex"
    result = invoke(["--once", "--address", "48", "--output", "-", "--capture", str(capture)])
    assert result.exit_code == 0, result.stderr
    live = tmp_path / "live.prom"
    live.write_text("live\n")
    decoded = invoke(["--decode", str(capture)], env={"KAMSTRUP_OUTPUT": str(live)})
    assert decoded.exit_code == 0, decoded.stderr
    assert live.read_text() == "live\n"  # on click 7 too: the tool reads the environment
    assert up_line(48, 1, meter="30303030") in decoded.stdout
    asked = invoke(["--decode", str(capture), "--output", str(live)])
    assert asked.exit_code == 0, asked.stderr
    assert up_line(48, 1, bus="live", meter="30303030") in live.read_text()
