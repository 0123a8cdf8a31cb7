"""Type F date-times and their SU (summer time) bit, bit 7 of the hour byte.

A meter sends its local time.  In the autumn's repeated hour (in Denmark 2026-10-25,
02:00-02:59 comes twice: first summer time, UTC+2, then standard time, UTC+1) the local
time alone names two instants; the SU bit tells them apart.  The tests run in Europe/
Copenhagen's rule, given as a POSIX TZ string so that no time zone database is needed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kamstrup_textfile as k

try:
    from test_properties import HEADER, encode_datetime_f, frame
    from tools import TOOL, require_tool, run_tool
except ImportError:  # pragma: no cover - when run as a package
    from tests.test_properties import HEADER, encode_datetime_f, frame
    from tests.tools import TOOL, require_tool, run_tool

COPENHAGEN = "CET-1CEST,M3.5.0,M10.5.0/3"  # Europe/Copenhagen since 1996
UTC = dt.timezone.utc


@pytest.fixture
def zone():
    """Switch this process's local time zone; put the old one back afterwards."""
    saved = os.environ.get("TZ")

    def use(tz: str) -> None:
        os.environ["TZ"] = tz
        time.tzset()

    yield use
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def clock_record(moment: dt.datetime, summer: bool) -> bytes:
    """04 6D: date and time, type F, with the SU bit as given."""
    data = bytearray(encode_datetime_f(moment))
    if summer:
        data[1] |= 0x80
    return b"\x04\x6d" + bytes(data)


def decode(moment: dt.datetime, summer: bool, ci: int = 0x72) -> k.Telegram:
    record = clock_record(moment, summer)
    if ci == 0x76:  # the same, most significant byte first (header and field turned round)
        head = HEADER[3::-1] + HEADER[5:3:-1] + HEADER[6:10] + HEADER[11:9:-1]
        return k.decode_telegram(frame(0x08, 48, 0x76, head + record[:2] + record[:1:-1]))
    return k.decode_telegram(frame(0x08, 48, 0x72, HEADER + record))


def timestamp(telegram: k.Telegram) -> float:
    series = k.record_series(telegram, telegram.records[0])
    assert series[0] == "clock_timestamp_seconds"
    return series[3]


def utc(*fields) -> float:
    return dt.datetime(*fields, tzinfo=UTC).timestamp()


REPEATED = dt.datetime(2026, 10, 25, 2, 30)  # 02:30 twice: 00:30 UTC and 01:30 UTC
SUMMER = dt.datetime(2026, 7, 1, 12, 0)
WINTER = dt.datetime(2026, 1, 15, 12, 0)
SKIPPED = dt.datetime(2026, 3, 29, 2, 30)  # 02:00-02:59 never happens that day


@pytest.mark.parametrize("ci", [0x72, 0x76], ids=["0x72", "0x76"])
def test_repeated_hour_su_set_is_the_first_0230(zone, ci):
    zone(COPENHAGEN)
    t = decode(REPEATED, summer=True, ci=ci)
    record = t.records[0]
    assert record.value == "2026-10-25T02:30"  # the local time, as before
    assert record.utc_offset == "+02:00"
    assert record.to_json()["utc_offset"] == "+02:00"
    assert timestamp(t) == utc(2026, 10, 25, 0, 30)


@pytest.mark.parametrize("ci", [0x72, 0x76], ids=["0x72", "0x76"])
def test_repeated_hour_su_clear_is_the_second_0230(zone, ci):
    zone(COPENHAGEN)
    t = decode(REPEATED, summer=False, ci=ci)
    record = t.records[0]
    assert record.value == "2026-10-25T02:30"
    assert record.utc_offset == "+01:00"
    assert timestamp(t) == utc(2026, 10, 25, 1, 30)


def test_the_two_0230s_are_an_hour_apart(zone):
    zone(COPENHAGEN)
    first = timestamp(decode(REPEATED, summer=True))
    second = timestamp(decode(REPEATED, summer=False))
    assert second - first == 3600


def test_summer_time_stated_by_the_meter(zone):
    zone(COPENHAGEN)
    t = decode(SUMMER, summer=True)
    assert t.records[0].utc_offset == "+02:00"
    assert timestamp(t) == utc(2026, 7, 1, 10, 0)


def test_su_clear_in_summer_is_read_as_before(zone):
    """Meters that never set SU send it clear all year: in July their 12:00 is local
    summer time.  Nothing is claimed about the offset; the JSON is what it always was."""
    zone(COPENHAGEN)
    t = decode(SUMMER, summer=False)
    assert t.records[0].utc_offset is None
    assert "utc_offset" not in t.records[0].to_json()
    assert timestamp(t) == utc(2026, 7, 1, 10, 0)


def test_winter(zone):
    zone(COPENHAGEN)
    t = decode(WINTER, summer=False)
    assert t.records[0].utc_offset is None
    assert timestamp(t) == utc(2026, 1, 15, 11, 0)


def test_su_set_where_the_zone_has_no_summer_time_is_ignored(zone):
    zone(COPENHAGEN)
    t = decode(WINTER, summer=True)  # summer time in January: not this host's zone
    assert t.records[0].utc_offset is None
    assert timestamp(t) == utc(2026, 1, 15, 11, 0)
    zone("UTC0")
    t = decode(SUMMER, summer=True)
    assert t.records[0].utc_offset is None
    assert timestamp(t) == utc(2026, 7, 1, 12, 0)


@pytest.mark.parametrize("summer", [True, False])
def test_the_skipped_spring_hour_has_no_offset(zone, summer):
    zone(COPENHAGEN)
    t = decode(SKIPPED, summer=summer)
    assert t.records[0].value == "2026-03-29T02:30"
    assert t.records[0].utc_offset is None


def test_json_text_carries_the_offset(zone):
    zone(COPENHAGEN)
    for summer, offset in ((True, "+02:00"), (False, "+01:00")):
        t = decode(REPEATED, summer)
        text = k.telegram_json(t)
        assert text == json.dumps(t.to_json())  # the fast JSON text, shapes and all
        assert json.loads(text)["records"][0]["utc_offset"] == offset


def test_decode_command_in_copenhagen(tmp_path):
    """The whole program, as a user runs it, in a zone given by the environment."""
    env = {**os.environ, "TZ": COPENHAGEN}
    for summer, offset, when in ((True, "+02:00", (0, 30)), (False, "+01:00", (1, 30))):
        path = tmp_path / f"{summer}.hex"
        path.write_text(frame(0x08, 48, 0x72, HEADER + clock_record(REPEATED, summer)).hex(" "))
        result = run_tool("--decode", str(path), "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        (record,) = json.loads(result.stdout)["meters"][0]["records"]
        assert (record["value"], record["utc_offset"]) == ("2026-10-25T02:30", offset)
        result = run_tool("--decode", str(path), env=env)
        stamp = int(utc(2026, 10, 25, *when))
        assert f'kamstrup_clock_timestamp_seconds{{meter="82937133"}} {stamp}\n' in result.stdout


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the same zone throughout
)
@given(st.datetimes(dt.datetime(1996, 1, 1), dt.datetime(2079, 12, 31)))
@example(dt.datetime(2026, 10, 25, 0, 30))  # 02:30 summer time, UTC
@example(dt.datetime(2026, 10, 25, 1, 30))  # 02:30 standard time, UTC
@example(dt.datetime(2026, 3, 29, 1, 0))  # 03:00 summer time, the first minute of it
def test_a_meter_that_sets_su_is_read_right_at_every_minute(zone, moment):
    """Any instant, shown as Copenhagen's local time with SU set in summer time (what a
    meter that keeps the flag sends), reads back as that instant: in the repeated hour
    too.  Without the SU bit half of that hour would be an hour off."""
    zone(COPENHAGEN)
    instant = int(moment.replace(second=0, microsecond=0, tzinfo=UTC).timestamp())
    local = time.localtime(instant)
    t = decode(dt.datetime(*local[:5]), summer=bool(local.tm_isdst))
    assert timestamp(t) == instant
    if local.tm_isdst:
        assert t.records[0].utc_offset == "+02:00"


# --- whatever the host's clock says (issue 16, item 9) ---------------------------------

ZONES = ("Europe/Copenhagen", "America/New_York", "Australia/Sydney", "Europe/London",
         "UTC", "Asia/Kolkata")  # fmt: skip
YEAR = 365 * 86400 + 21600  # CPython's year, for where it looks for January and July


def pretend_now(monkeypatch, now: float) -> None:
    """The process's notion of "now": time.time, and the module constants that CPython's
    tzset computes from the current year (January's and July's offsets then)."""
    monkeypatch.setattr(time, "time", lambda: now)
    january = int(now // YEAR * YEAR)
    jan = -time.localtime(january).tm_gmtoff
    jul = -time.localtime(january + YEAR // 2).tm_gmtoff
    standard, summer = (jul, jan) if jan < jul else (jan, jul)  # south: July is winter
    monkeypatch.setattr(time, "timezone", standard)
    monkeypatch.setattr(time, "altzone", summer)
    monkeypatch.setattr(time, "daylight", int(jan != jul))


NOWS = (0.0, 1e9, time.time(), 3e9)  # 1970, 2001, the real clock, 2065


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from(ZONES),
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2079, 12, 30)),
    st.sampled_from(NOWS),
)
@example("Europe/Copenhagen", dt.datetime(2026, 10, 25, 0, 30), 0.0)  # 02:30 CEST
@example("Europe/Copenhagen", dt.datetime(2026, 10, 25, 1, 30), 0.0)  # 02:30 CET
@example("Australia/Sydney", dt.datetime(2026, 4, 4, 15, 30), 0.0)  # 02:30 AEDT, south
@example("Australia/Sydney", dt.datetime(2026, 4, 4, 16, 30), 0.0)  # 02:30 AEST
@example("America/New_York", dt.datetime(2026, 11, 1, 5, 30), 0.0)  # 01:30 EDT
@example("America/New_York", dt.datetime(2026, 11, 1, 6, 30), 0.0)  # 01:30 EST
@example("Europe/London", dt.datetime(2026, 10, 25, 0, 30), 0.0)  # 01:30 BST; 1970 was BST
def test_the_su_bit_does_not_depend_on_the_hosts_now(zone, monkeypatch, name, moment, now):
    """A meter that keeps SU, anywhere, at any minute: read back as that instant whatever
    year the host's clock says (1970 before NTP had no summer time in Europe)."""
    zone(name)
    instant = int(moment.replace(second=0, microsecond=0, tzinfo=UTC).timestamp())
    local = time.localtime(instant)
    with monkeypatch.context() as patch:
        pretend_now(patch, now)
        t = decode(dt.datetime(*local[:5]), summer=bool(local.tm_isdst))
        assert timestamp(t) == instant


def test_decode_under_a_1970_clock_as_under_the_real_one(tmp_path):
    """The program itself, its clock set to 1970 by faketime: the SU bit still decides."""
    faketime = require_tool("faketime")
    env = {**os.environ, "TZ": "Europe/Copenhagen", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    for summer, offset, when in ((True, "+02:00", (0, 30)), (False, "+01:00", (1, 30))):
        path = tmp_path / f"{summer}.hex"
        path.write_text(frame(0x08, 48, 0x72, HEADER + clock_record(REPEATED, summer)).hex(" "))
        outputs = {}
        for clock in ([], [faketime, "1970-01-01 00:00:00"]):
            name = "1970" if clock else "real"
            for fmt in ("json", "prom"):
                result = subprocess.run(
                    [*clock, sys.executable, TOOL, "--decode", str(path), "--format", fmt],
                    capture_output=True, text=True, env=env, timeout=60,
                )  # fmt: skip
                assert result.stdout, result.stderr
                outputs[name, fmt] = result.stdout
        for name in ("real", "1970"):
            (record,) = json.loads(outputs[name, "json"])["meters"][0]["records"]
            assert (record["value"], record.get("utc_offset")) == ("2026-10-25T02:30", offset)
            stamp = int(utc(2026, 10, 25, *when))
            line = f'kamstrup_clock_timestamp_seconds{{meter="82937133"}} {stamp}\n'
            assert line in outputs[name, "prom"], name
        assert outputs["real", "json"] == outputs["1970", "json"]
