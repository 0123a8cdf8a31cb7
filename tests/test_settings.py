"""Issue 16, the command line's side: a hand run is the timer's run, the environment is
an interface (not a side door), one meter is one series however many buses write into
one textfile directory, and bytes are UTF-8 whatever the locale.

The settings file is parsed as systemd's EnvironmentFile= parses it (FIELD-NOTES.md,
"two parsers read one file"); tests/test_container.py compares the two on a real
systemd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kamstrup_textfile as kt

try:
    from tools import ROOT, TOOL, require_tool
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, TOOL, require_tool

SIM = [sys.executable, str(ROOT / "kamstrup_sim.py")]
TWO = ["--meter", "303:48:71234567", "--meter", "403:133:67434187"]


def env(**extra) -> dict:
    """The environment of a run: no KAMSTRUP_* but those given (conftest clears them)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("KAMSTRUP_")}
    out.update(extra)
    return out


def run(*args, environ=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, env=environ,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def hand_run(config: Path, *args, meters=TWO, environ=None) -> subprocess.CompletedProcess:
    """`kamstrup-textfile --once ARGS` with the simulated bus's port written into the
    settings file (as a person's /etc/default/kamstrup names the adapter), not in the
    environment: kamstrup-sim's own KAMSTRUP_PORT and KAMSTRUP_BAUDRATE are taken away."""
    script = (
        'printf "KAMSTRUP_PORT=%s\\n" "$KAMSTRUP_PORT" >> "$1"; shift; '
        'unset KAMSTRUP_PORT KAMSTRUP_BAUDRATE; exec "$@"'
    )
    cmd = [*SIM, *meters, "--", "sh", "-c", script, "sh", str(config), sys.executable, TOOL,
           "--config", str(config), "--once", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, env=environ or env(), timeout=120, cwd=ROOT)


def samples(text: str) -> list:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def series(text: str) -> set:
    """(name, labels) of every sample: what node_exporter keys a series by."""
    return {line.rsplit(" ", 1)[0] for line in samples(text)}


def up_lines(text: str) -> list:
    return [line for line in samples(text) if line.startswith("kamstrup_up{")]


# --- the settings file, parsed as systemd parses it ----------------------------------------

# FIELD-NOTES.md's table (tried on Debian 13, systemd 257), and more of systemd's rules.
SYSTEMD_READS = [  # fmt: skip
    ('A=location="boiler room"\n', {"A": 'location="boiler room"'}),
    (
        "B='location=\"boiler room\" building=north'\n",
        {"B": 'location="boiler room" building=north'},
    ),
    ('C="location=boiler room"\n', {"C": "location=boiler room"}),
    ("D=kamstrup.prom   \n", {"D": "kamstrup.prom"}),
    ("F=x # comment\n", {"F": "x # comment"}),
    ("G=value\r\n", {"G": "value"}),
    ("# a comment\n; another\n  H = spaced  \n", {"H": "spaced"}),
    ('I="a\\"b\\\\c\\d"\n', {"I": 'a"b\\c\\d'}),
    ("J=one\\\ntwo\n", {"J": "onetwo"}),
    ("export K=1\nL=\nM\n", {"L": ""}),
    ("N='multi\nline'\n", {"N": "multi\nline"}),
    ("O=first\nO=second\n", {"O": "second"}),
    ('P="quoted" tail\n', {"P": "quotedtail"}),
    ("Q=no newline at the end  ", {"Q": "no newline at the end"}),
    ("R='open quote at the end", {"R": "open quote at the end"}),
    ("S=", {"S": ""}),
]


@pytest.mark.parametrize(("text", "expected"), SYSTEMD_READS)
def test_the_settings_file_reads_as_systemd_reads_it(tmp_path, text, expected):
    path = tmp_path / "kamstrup"
    path.write_bytes(text.encode("utf-8"))
    assert kt.read_settings(str(path)) == expected


@pytest.mark.parametrize(
    "data", [b"A=K\xf6ln\n", b"KAMSTRUP_\xc4DDRESS=48\n", b"A='\xff'\n", b"A=48\x00\n",
             b"# a NUL \x00 in a comment\nA=1\n"],
)  # fmt: skip
def test_a_file_systemd_refuses_is_refused(tmp_path, data):
    """systemd 252 refuses the whole file (the unit does not start: "Bad message",
    tests/test_container.py shows it): so does the tool, one line, exit 2."""
    path = tmp_path / "kamstrup"
    path.write_bytes(data)
    with pytest.raises(kt.SettingsError):
        kt.read_settings(str(path))
    done = run("--once", "--config", str(path), "--output", str(tmp_path / "k.prom"))
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1
    assert f"settings file {path}:".encode() in done.stderr
    assert not (tmp_path / "k.prom").exists()


def test_a_comment_that_is_not_utf8_is_a_comment(tmp_path):
    path = tmp_path / "kamstrup"
    path.write_bytes(b"# K\xf6ln\nB=ok\n")
    assert kt.read_settings(str(path)) == {"B": "ok"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_settings_or_nothing_never_an_exception(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("s") / "kamstrup"
    path.write_bytes(data)
    try:
        found = kt.read_settings(str(path))
    except kt.SettingsError:
        assert b"\0" in data or not data.decode("utf-8", "ignore").encode() == data
        return
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in found)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters="'\x00", blacklist_categories=("Cs",))))
def test_a_single_quoted_value_reads_back_as_written(tmp_path_factory, value):
    """The form kamstrup.default uses for values with blanks or quotes: both parsers read
    it alike (systemd, and a shell that sources the file)."""
    path = tmp_path_factory.mktemp("s") / "kamstrup"
    path.write_bytes(f"KAMSTRUP_LABEL='{value}'\n".encode())
    assert kt.read_settings(str(path)) == {"KAMSTRUP_LABEL": value}


# --- 1. a hand run is the timer's run ------------------------------------------------------


def live_config(tmp_path: Path, *lines: str) -> tuple:
    """A settings file naming a live file in a textfile directory of its own."""
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    live = textfile / "kamstrup.prom"
    config = tmp_path / "kamstrup"
    config.write_text(
        "\n".join(['KAMSTRUP_ADDRESS="48 133"', f"KAMSTRUP_OUTPUT={live}", *lines]) + "\n"
    )
    return config, live


def test_a_hand_run_reads_the_settings_file(tmp_path):
    config, live = live_config(tmp_path, "KAMSTRUP_LABEL='location=\"boiler room\"'")
    done = hand_run(config)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    text = live.read_text(encoding="utf-8")
    assert up_lines(text) == [
        'kamstrup_up{address="48",bus="kamstrup",meter="71234567",location="boiler room"} 1',
        'kamstrup_up{address="133",bus="kamstrup",meter="67434187",location="boiler room"} 1',
    ]


def test_a_hand_run_with_other_meters_leaves_the_live_file_alone(tmp_path):
    config, live = live_config(tmp_path)
    assert hand_run(config).returncode == 0
    before, mtime = live.read_bytes(), live.stat().st_mtime_ns
    done = hand_run(config, "--address", "48")
    assert done.returncode == 0, done.stderr
    assert live.read_bytes() == before and live.stat().st_mtime_ns == mtime
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "--address is not the configuration's" in lines[0]
    assert str(live) in lines[0] and "standard output" in lines[0]
    assert up_lines(done.stdout.decode()) == [
        'kamstrup_up{address="48",bus="kamstrup",meter="71234567"} 1'
    ]
    assert sorted(os.listdir(live.parent)) == ["kamstrup.prom"]


def test_the_configured_port_by_another_name_is_the_same_bus(tmp_path):
    """The file names the udev link, the hand run the device it points to."""
    config, live = live_config(tmp_path)
    link = tmp_path / "ttymeterBus"
    config.write_text(config.read_text() + f"KAMSTRUP_PORT={link}\n")
    script = ('ln -s "$KAMSTRUP_PORT" "$1"; p=$KAMSTRUP_PORT; unset KAMSTRUP_PORT '
              'KAMSTRUP_BAUDRATE; shift; exec "$@" --port "$p"')  # fmt: skip
    cmd = [*SIM, *TWO, "--", "sh", "-c", script, "sh", str(link), sys.executable, TOOL,
           "--config", str(config), "--once"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, env=env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"" and len(up_lines(live.read_text())) == 2


def test_the_environment_of_a_hand_run_is_not_the_configuration(tmp_path):
    """KAMSTRUP_ADDRESS=48 kamstrup-textfile --once is a hand run of one meter; under
    systemd ($INVOCATION_ID) the unit's environment is the configuration."""
    config, live = live_config(tmp_path)
    assert hand_run(config).returncode == 0
    before = live.read_bytes()
    done = hand_run(config, environ=env(KAMSTRUP_ADDRESS="48"))
    assert done.returncode == 0, done.stderr
    assert live.read_bytes() == before
    assert b"KAMSTRUP_ADDRESS in the environment is not the configuration's" in done.stderr
    done = hand_run(config, environ=env(KAMSTRUP_ADDRESS="48", INVOCATION_ID="0123abcd"))
    assert done.returncode == 0 and done.stderr == b""
    assert len(up_lines(live.read_text())) == 1


def test_a_hand_run_with_other_meters_may_not_name_the_live_file(tmp_path):
    config, live = live_config(tmp_path)
    assert hand_run(config).returncode == 0
    before = live.read_bytes()
    done = hand_run(config, "--address", "48", "--output", str(live))
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert b"is the live file" in done.stderr and b"forget meters" in done.stderr
    assert live.read_bytes() == before


def test_a_hand_run_with_other_meters_writes_where_output_says(tmp_path):
    config, live = live_config(tmp_path)
    elsewhere = tmp_path / "test.prom"
    done = hand_run(config, "--address", "48", "--output", str(elsewhere))
    assert done.returncode == 0, done.stderr
    assert not live.exists()
    assert "71234567" in elsewhere.read_text()


def test_a_failing_meter_keeps_its_serial_number_on_kamstrup_up(tmp_path):
    config, live = live_config(tmp_path)
    assert hand_run(config).returncode == 0
    silent = ["--meter", "303:48:71234567", "--meter", "403:133:67434187,silent"]
    done = hand_run(config, meters=silent)
    assert done.returncode == 1
    text = live.read_text()
    assert 'kamstrup_up{address="133",bus="kamstrup",meter="67434187"} 0' in up_lines(text)
    assert re.search(r'last_success_timestamp_seconds\{address="133",bus="kamstrup"\} \d', text)


# --- 2-5. the environment is an interface -------------------------------------------------


def decode_run(*args, **variables) -> subprocess.CompletedProcess:
    frame = ROOT / "tests" / "data" / "kamstrup" / "multical303_heat.hex"
    return run("--decode", str(frame), *args, environ=env(**variables))


@pytest.mark.parametrize("value", ["1", "1.2", "true", ""])
def test_version_in_the_environment_is_no_action(tmp_path, value):
    out = tmp_path / "k.prom"
    done = run("--once", "--port", str(tmp_path / "none"), "--output", str(out),
               environ=env(KAMSTRUP_VERSION=value))  # fmt: skip
    assert kt.__version__.encode() not in done.stdout
    assert out.exists(), "the run did its job"
    if value:
        assert b"KAMSTRUP_VERSION in the environment is ignored: --version" in done.stderr
    done = run(
        environ=env(
            KAMSTRUP_VERSION=value,
            KAMSTRUP_ONCE="1",  # never the live file
            KAMSTRUP_OUTPUT=str(out),
            KAMSTRUP_PORT=str(tmp_path / "none"),
        )
    )
    assert done.returncode == 2 and b"nothing to do" in done.stderr
    assert b"KAMSTRUP_ONCE in the environment is ignored: --once is given on" in done.stderr


@pytest.mark.parametrize(
    ("name", "near"),
    [("KAMSTRUP_ADRESS", "KAMSTRUP_ADDRESS"), ("KAMSTRUP_ADDRESSES", "KAMSTRUP_ADDRESS"),
     ("KAMSTRUP_LABELS", "KAMSTRUP_LABEL"), ("KAMSTRUP_FMT", "KAMSTRUP_FORMAT"),
     ("KAMSTRUP_CAPTURE_FILE", "KAMSTRUP_CAPTURE"), ("KAMSTRUP_DECODE_FILE", None),
     ("KAMSTRUP_SCAN_SECONDARY", None), ("KAMSTRUP_XYZZY", None), ("KAMSTRUP_SETUP", None),
     ("KAMSTRUP_YES", None)],
)  # fmt: skip
def test_an_unknown_name_is_one_warning_and_is_not_read(name, near):
    values = {"KAMSTRUP_ADRESS": "74", "KAMSTRUP_ADDRESSES": "74", "KAMSTRUP_LABELS": "a=b",
              "KAMSTRUP_FMT": "json", "KAMSTRUP_CAPTURE_FILE": "/tmp/x.hex",
              "KAMSTRUP_DECODE_FILE": "/etc/hostname", "KAMSTRUP_SCAN_SECONDARY": "1",
              "KAMSTRUP_XYZZY": "1", "KAMSTRUP_SETUP": "1", "KAMSTRUP_YES": "1"}  # fmt: skip
    done = decode_run("--output", "-", **{name: values[name]})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and name in lines[0]
    if near:
        assert f"did you mean {near}?" in lines[0]
    assert done.stdout.startswith(b"# HELP"), "prom, as without the variable"
    assert b'a="b"' not in done.stdout


def test_every_setting_is_in_help_and_in_kamstrup_default():
    done = run("--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    default = (ROOT / "kamstrup.default").read_text()
    for name in kt.SETTINGS:
        assert name in text, name
        assert re.search(rf"^#?{name}=", default, re.M), name
    named = set(re.findall(r"^#?(KAMSTRUP_[A-Z_]+)=", default, re.M))
    assert named == set(kt.SETTINGS)


def test_a_bad_value_names_the_variable_and_where_it_came_from(tmp_path):
    own = ["--port", str(tmp_path / "none"), "--output", str(tmp_path / "k.prom")]
    done = run("--once", *own, environ=env(KAMSTRUP_BAUDRATE="9500"))
    assert done.returncode == 2
    assert done.stderr.count(b"\n") == 1
    assert b"KAMSTRUP_BAUDRATE in the environment: '9500' is not an M-Bus baud rate" in done.stderr
    config = tmp_path / "kamstrup"
    config.write_text("KAMSTRUP_RETRIES=many\n")
    done = run("--once", "--config", str(config), *own)
    assert done.returncode == 2
    assert f"KAMSTRUP_RETRIES in {config}:".encode() in done.stderr
    assert not (tmp_path / "k.prom").exists()
    assert b"--retries" not in done.stderr


def test_the_timers_capture_does_not_stop_a_decode(tmp_path):
    done = decode_run("--output", "-", KAMSTRUP_CAPTURE=str(tmp_path / "capture.hex"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "capture.hex").exists()
    done = decode_run("--capture", str(tmp_path / "capture.hex"))
    assert done.returncode == 2, "given on the command line, it is a usage error as before"


def test_json_is_never_written_to_a_prom_path(tmp_path):
    out = tmp_path / "kamstrup.prom"
    done = decode_run("--output", str(out), KAMSTRUP_FORMAT="json")
    assert done.returncode == 2 and not out.exists()
    assert b"KAMSTRUP_FORMAT in the environment would write JSON into" in done.stderr
    done = decode_run("--output", str(out), "--format", "json")
    assert done.returncode == 2 and not out.exists()
    done = decode_run("--output", "-", KAMSTRUP_FORMAT="json")
    assert done.returncode == 0 and done.stdout.startswith(b'{"meters"')
    config = tmp_path / "kamstrup"  # the configured output (never this machine's live file)
    config.write_text(f"KAMSTRUP_OUTPUT={out}\nKAMSTRUP_PORT={tmp_path / 'none'}\n")
    done = run("--once", "--config", str(config), environ=env(KAMSTRUP_FORMAT="json"))
    assert done.returncode == 2 and not out.exists(), "the configured output is a .prom file"


def test_values_are_stripped(tmp_path):
    out = tmp_path / "k.prom"
    done = subprocess.run(
        [*SIM, "--", "sh", "-c", 'KAMSTRUP_PORT=" $KAMSTRUP_PORT	" exec "$@"', "sh",
         sys.executable, TOOL, "--once"],
        capture_output=True, env=env(KAMSTRUP_OUTPUT=f" {out}  \r"), timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path) == ["k.prom"]


def test_a_comment_after_a_value_is_a_usage_error_naming_the_setting(tmp_path):
    config, live = live_config(tmp_path)
    config.write_text(f"KAMSTRUP_OUTPUT={live} # live\nKAMSTRUP_PORT={tmp_path / 'none'}\n")
    done = run("--once", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.count(b"\n") == 1
    assert f"KAMSTRUP_OUTPUT in {config} ends in a comment".encode() in done.stderr
    assert os.listdir(live.parent) == []
    config.write_text("KAMSTRUP_LABEL=location=cellar # where it hangs\n")
    done = run("--once", "--config", str(config), "--output", str(tmp_path / "k.prom"))
    assert done.returncode == 2 and b"KAMSTRUP_LABEL" in done.stderr


def test_a_label_with_a_space_through_the_environment(tmp_path):
    labels = "location=\"boiler room\" building='north wing'"
    done = decode_run("--output", "-", KAMSTRUP_LABEL=labels)
    assert done.returncode == 0, done.stderr
    assert b'location="boiler room",building="north wing"} 1' in done.stdout
    done = decode_run("--output", "-", KAMSTRUP_LABEL='location="boiler room')
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1
    assert b"KAMSTRUP_LABEL in the environment" in done.stderr


# --- 6. one meter, one series ----------------------------------------------------------------


def two_buses(tmp_path: Path) -> tuple:
    """Two configurations, two adapters, one textfile directory, a meter at 48 on each."""
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    outs = []
    for name, meter in (("kamstrup", "303:48:71234567"), ("heat2", "403:48:67434187")):
        config = tmp_path / name
        out = textfile / f"{name}.prom"
        config.write_text(f"KAMSTRUP_ADDRESS=48\nKAMSTRUP_OUTPUT={out}\n")
        done = hand_run(config, meters=["--meter", meter])
        assert done.returncode == 0, done.stderr
        assert done.stderr == b""
        outs.append(out)
    return textfile, outs


def test_two_buses_never_write_the_same_series(tmp_path):
    _, (first, second) = two_buses(tmp_path)
    a, b = first.read_text(), second.read_text()
    assert series(a) and series(b) and not series(a) & series(b)
    assert 'kamstrup_up{address="48",bus="kamstrup",meter="71234567"} 1' in up_lines(a)
    assert 'kamstrup_up{address="48",bus="heat2",meter="67434187"} 1' in up_lines(b)


def test_node_exporter_serves_both_buses(tmp_path):
    from test_prometheus import NODE_EXPORTER, free_port, value, wait_for
    from test_prometheus import samples as scraped

    textfile, _ = two_buses(tmp_path)
    exporter = require_tool(NODE_EXPORTER)
    port = free_port()
    proc = subprocess.Popen(
        [exporter, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={textfile}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        found = scraped(wait_for(f"http://127.0.0.1:{port}/metrics", proc))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert value(found, "kamstrup_up", bus="kamstrup", address="48", meter="71234567") == 1
    assert value(found, "kamstrup_up", bus="heat2", address="48", meter="67434187") == 1
    assert value(found, "node_textfile_scrape_error") == 0


def test_a_renamed_output_is_told_of_the_old_file(tmp_path):
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    config = tmp_path / "kamstrup"
    config.write_text(f"KAMSTRUP_ADDRESS=48\nKAMSTRUP_OUTPUT={textfile / 'kamstrup.prom'}\n")
    assert hand_run(config, meters=["--meter", "303:48:71234567"]).returncode == 0
    config.write_text(f"KAMSTRUP_ADDRESS=48\nKAMSTRUP_OUTPUT={textfile / 'heat.prom'}\n")
    done = hand_run(config, meters=["--meter", "303:48:71234567"])
    assert done.returncode == 0
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert f"{textfile / 'kamstrup.prom'} carries meter 71234567 too" in lines[0]


# --- 14. UTF-8 whatever the locale ------------------------------------------------------------

C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def test_a_non_ascii_label_is_utf8_in_the_c_locale(tmp_path):
    out = tmp_path / "k.prom"
    done = decode_run("--output", str(out), "--label", "room=Küche", **C_LOCALE,
                      KAMSTRUP_LABEL="building=Nørrebro")  # fmt: skip
    # --label on the command line wins over KAMSTRUP_LABEL as a whole
    assert done.returncode == 0, done.stderr
    assert 'room="Küche"}'.encode() in out.read_bytes()
    done = decode_run("--output", str(out), **C_LOCALE, KAMSTRUP_LABEL="building='Nørrebro'")
    assert done.returncode == 0, done.stderr
    assert 'building="Nørrebro"}'.encode() in out.read_bytes()


def test_a_capture_with_a_utf8_comment_decodes_in_the_c_locale(tmp_path):
    frame = (ROOT / "tests" / "data" / "kamstrup" / "multical303_heat.hex").read_text()
    capture = tmp_path / "capture.hex"
    capture.write_text("# read at the Küche, port /dev/zähler\n" + frame, encoding="utf-8")
    done = run("--decode", str(capture), environ=env(**C_LOCALE))
    assert done.returncode == 0, done.stderr
    assert b"kamstrup_energy_joules_total" in done.stdout


def test_messages_and_help_are_utf8_in_the_c_locale(tmp_path):
    port = tmp_path / "zähler"
    done = run("--once", "--port", str(port), "--output", str(tmp_path / "k.prom"),
               environ=env(**C_LOCALE))  # fmt: skip
    assert done.returncode == 1
    assert f"port {port} does not exist".encode() in done.stderr
    done = run("--help", environ=env(**C_LOCALE))
    assert done.returncode == 0 and b"KAMSTRUP_LABEL" in done.stdout


def test_what_systemd_252_passed_is_what_read_settings_reads(tmp_path):
    """The lines and file ends that tests/test_container.py gave a real systemd 252, with
    what it passed on, recorded there: the fast check of the same agreement."""
    from test_container import SETTINGS_FILE_ENDS, SETTINGS_LINES, SYSTEMD_252_SETTINGS

    path = tmp_path / "kamstrup"
    path.write_bytes("".join(SETTINGS_LINES).encode("utf-8"))
    joined: list = []
    found = kt.read_settings(str(path), joined)
    # the one place 252 and 257 differ: a comment ending in a backslash (257 ends it at
    # its line's end, and the next line is a setting; 252 joined them): we read as 257,
    # and say so
    assert found.pop("KT_AFTER_COMMENT_BACKSLASH") == "1"
    assert found == SYSTEMD_252_SETTINGS
    assert len(joined) == 1
    for text, expected in SETTINGS_FILE_ENDS.items():
        path.write_bytes(text.encode("utf-8"))
        assert kt.read_settings(str(path)) == expected, text


def test_yes_goes_with_setup():
    done = decode_run("--yes")
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1
    assert b"--yes answers --setup's questions" in done.stderr


@pytest.mark.slow
def test_the_simulator_is_not_the_configured_bus(tmp_path):
    """kamstrup-sim -- kamstrup-textfile --once (the README's first command) on a machine
    whose /etc/default/kamstrup names other meters reads the simulated bus, not those:
    in a private mount namespace, so this machine's /etc is never touched."""
    unshare = require_tool("unshare")
    out = tmp_path / "kamstrup.prom"
    settings = "KAMSTRUP_ADDRESS='133 74'\\nKAMSTRUP_BAUDRATE=9600\\n"
    script = ("mount -t tmpfs tmpfs /etc/default && "
              f'printf "{settings}" > /etc/default/kamstrup && exec "$@"')  # fmt: skip
    environ = {k: v for k, v in env().items() if k != "KAMSTRUP_CONFIG"}
    done = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
                           *SIM, "--", sys.executable, TOOL, "--once", "--output", str(out)],
                          capture_output=True, env=environ, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert up_lines(out.read_text()) == [
        'kamstrup_up{address="254",bus="kamstrup",meter="30303030"} 1'
    ]


def test_a_comment_ending_in_a_backslash_is_read_as_systemd_257_reads_it(tmp_path):
    config = tmp_path / "kamstrup"
    config.write_text("# the bus in the cellar \\\nKAMSTRUP_ADDRESS=48\n")
    assert kt.read_settings(str(config)) == {"KAMSTRUP_ADDRESS": "48"}
    done = decode_run("--config", str(config), "--output", "-")
    assert done.returncode == 0
    assert done.stderr.count(b"\n") == 1
    assert b"line 1 of" in done.stderr and b"systemd 252 (Debian 12)" in done.stderr


def test_an_emptied_variable_is_named_as_such_and_a_lower_case_name_warns(tmp_path):
    config, live = live_config(tmp_path)
    assert hand_run(config).returncode == 0
    before = live.read_bytes()
    done = hand_run(config, environ=env(KAMSTRUP_ADDRESS=""))  # 254: both meters answer
    assert live.read_bytes() == before
    assert b"KAMSTRUP_ADDRESS= (empty) in the environment is not the configuration's" in (
        done.stderr
    )
    config.write_text(config.read_text() + "kamstrup_bus=heat\n")
    done = hand_run(config)
    assert b"kamstrup_bus in" in done.stderr and b"KAMSTRUP_BUS" in done.stderr


def test_no_kamstrup_variable_of_the_test_machinery_reaches_the_tool():
    """The tool warns of every KAMSTRUP_* name it does not know: the tests' own settings
    (the .deb CI built, the root file systems' cache) must not be such names, or every
    run under CI says a warning line more (KAMSTRUP_DEB did)."""
    import pathlib

    ci = (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"export KAMSTRUP_", ci)
    names = {
        m
        for p in pathlib.Path(ROOT / "tests").glob("*.py")
        for m in re.findall(r"environ(?:\.get)?[\[(]\"(KAMSTRUP_\w+)", p.read_text())
    }
    assert names <= set(kt.SETTINGS) | {kt.CONFIG_VARIABLE}, names
