"""KMP frames and values (kamstrup_kmp sections 1 and 2): the Kamstrup document's examples
(tests/data/kmp), round trips, and any bytes in."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kamstrup_kmp as kmp

DATA = Path(__file__).resolve().parent / "data" / "kmp"


def document(kind: str) -> list:
    with open(DATA / "kamstrup_document.tsv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["kind"] == kind]
    assert rows
    return [pytest.param(r["hex"], r["meaning"], id=f"{r['section']} {r['what']}") for r in rows]


@pytest.mark.parametrize(("frame", "body"), document("stuffing"))
def test_document_stuffing(frame, body):
    frame, body = bytes.fromhex(frame), bytes.fromhex(body)
    assert kmp.unstuff(frame[1:-1]) == body
    assert kmp.stuff(body) == frame[1:-1]


@pytest.mark.parametrize(("frame", "body"), document("request"))
def test_document_requests(frame, body):
    frame, body = bytes.fromhex(frame), bytes.fromhex(body)
    assert kmp.request_frame(body[1], body[2:-2], destination=body[0]) == frame
    assert kmp.parse_frame(frame, kmp.START_REQUEST) == kmp.KmpFrame(body[0], body[1], body[2:-2])


@pytest.mark.parametrize(("frame", "body"), document("answer"))
def test_document_answers(frame, body):
    frame, body = bytes.fromhex(frame), bytes.fromhex(body)
    assert kmp.parse_frame(frame) == kmp.KmpFrame(body[0], body[1], body[2:-2])
    assert kmp.answer_frame(body[1], body[2:-2]) == frame


@pytest.mark.parametrize(("body", "same"), document("body"))
def test_document_crc(body, same):
    body = bytes.fromhex(body)
    assert kmp.crc16(body) == 0  # the CRC over a body with its CRC bytes
    assert kmp.crc16(body[:-2]) == int.from_bytes(body[-2:], "big")


@pytest.mark.parametrize(("number", "exact"), document("number"))
def test_document_numbers(number, exact):
    raw = bytes.fromhex(number)
    value = kmp.decode_number(raw[1], raw[2:])
    assert value == Decimal(exact)
    assert kmp.encode_number(value, raw[0]) == (raw[1], raw[2:])


def test_document_get_register_answer():
    """6.2.4: register 0x0080, unit 0x16 (kW), 19591204 x 10^17."""
    frame = kmp.parse_frame(bytes.fromhex("403F10001B7F160411012AF02463030D"))
    registers = kmp.parse_registers(frame, [0x80])
    assert registers == {0x80: kmp.Register(0x80, 0x16, Decimal("19591204E17"))}
    assert registers[0x80].unit == "W"
    assert registers[0x80].si == 19591204 * 10**20


def test_document_serial_and_type():
    assert kmp.parse_serial(kmp.parse_frame(bytes.fromhex("403F0201234567E9560D"))) == 0x01234567
    body = bytes.fromhex("3F01000406012699")
    assert kmp.parse_type(kmp.KmpFrame(body[0], body[1], body[2:-2])) == (4, "F1")


# -- the one-pass unstuffing ---------------------------------------------------


def test_data_1b_f2_unstuffs_to_itself():
    """A data 1B F2 is sent 1B E4 F2; undoing 1B E4 first and then looking again (PyKMP
    0.0.2's replace() per byte) would make 1B F2 into 0D."""
    body = bytes((0x3F, 0x10, 0x1B, 0xF2))
    assert kmp.stuff(body) == bytes((0x3F, 0x10, 0x1B, 0xE4, 0xF2))
    assert kmp.unstuff(kmp.stuff(body)) == body
    frame = kmp.answer_frame(0x10, body[2:])
    assert kmp.parse_frame(frame).data == body[2:]


def test_stuffed_bytes_next_to_each_other():
    data = bytes((0x06, 0x0D, 0x1B, 0x40, 0x80, 0x1B, 0x1B, 0xE4, 0xF2))
    frame = kmp.answer_frame(0x10, data)
    assert frame[1:-1].count(bytes((0x1B,))) == 7  # one per stuffed byte
    assert kmp.parse_frame(frame).data == data


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("403F0201234567E9570D", "CRC 0xE957, expected 0xE956"),
        ("403F0201234567E956", "no stop byte"),
        ("403F02012345671B0D", "a stuffing byte 1B at the end"),
        ("403F021B00234567E9560D", "stuffing 1B 00 stands for FF, which is never stuffed"),
        ("403F0240234567E9560D", "an unstuffed 40 inside the frame"),
        ("803F0201234567E9560D", "start byte 80, expected 40"),
        ("403F010D", "2 bytes between start and stop, at least 4 expected"),
        ("", "no bytes"),
    ],
)
def test_frame_faults_are_named(frame, message):
    with pytest.raises(kmp.KmpFrameError, match=f"^{message}$".replace("(", r"\(")):
        kmp.parse_frame(bytes.fromhex(frame))


def test_a_lone_ack():
    assert kmp.is_ack(b"\x06")
    assert not kmp.is_ack(b"\x06\x06")


def test_find_answer_skips_echo_and_noise():
    request = kmp.get_register_request([60, 68])
    answer = bytes.fromhex("403F0201234567E9560D")
    buf = request + b"\x00\x0d\x40\x12" + answer + b"\xff"
    frame, end = kmp.find_answer(buf)
    assert frame == answer
    assert buf[end:] == b"\xff"
    assert kmp.find_answer(request + answer[:-1]) == (None, 0)


# -- any payload, any bytes ------------------------------------------------------


@given(st.binary(max_size=80))
def test_any_payload_stuffs_and_unstuffs_back(body):
    stuffed = kmp.stuff(body)
    assert not set(stuffed) & (kmp.STUFFED - {kmp.ESCAPE})
    assert kmp.unstuff(stuffed) == body


@given(st.integers(0, 255), st.binary(max_size=80), st.integers(0, 255))
def test_any_frame_round_trips(cid, data, destination):
    frame = kmp.answer_frame(cid, data, destination)
    assert frame.count(kmp.START_ANSWER) == 1 and frame.count(kmp.STOP) == 1
    assert kmp.parse_frame(frame) == kmp.KmpFrame(destination, cid, data)
    assert kmp.find_answer(b"\x80\x0d" + frame) == (frame, len(frame) + 2)


@given(st.binary(max_size=60))
def test_any_bytes_give_a_frame_or_a_frame_error(buf):
    for candidate in (buf, b"\x40" + buf + b"\x0d"):
        try:
            frame = kmp.parse_frame(candidate)
        except kmp.KmpFrameError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert kmp.answer_frame(frame.cid, frame.data, frame.destination) == candidate


@given(st.binary(max_size=60))
def test_any_register_data_decodes_or_says_why(data):
    try:
        registers = kmp.parse_registers(kmp.KmpFrame(0x3F, 0x10, data))
    except kmp.KmpFrameError as exc:
        assert str(exc)
    else:
        for reg in registers.values():
            assert isinstance(reg.exact, Decimal)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(-20, 20),
    st.booleans(),
)
def test_any_number_round_trips_exactly(mantissa, exponent, negative):
    value = Decimal((1 if negative else 0, tuple(map(int, str(mantissa))), exponent))
    sigexp, raw = kmp.encode_number(value, 4)
    assert kmp.decode_number(sigexp, raw) == value
    assert str(kmp.decode_number(sigexp, raw)) == str(value)  # the same digits, exactly


# -- requests and the plan --------------------------------------------------------


def test_ten_registers_take_two_requests():
    plan = kmp.read_plan()
    assert [len(batch) for batch in plan] == [8, 2]
    assert sorted(sum(plan, [])) == sorted(kmp.REGISTERS)
    assert kmp.SERIAL_NUMBER in sum(plan, [])


def test_get_register_takes_at_most_eight():
    with pytest.raises(ValueError, match="1 to 8"):
        kmp.get_register_request(list(range(9)))
    with pytest.raises(ValueError, match="1 to 8"):
        kmp.get_register_request([])


def test_info_code_is_register_99_not_the_event_counter_113():
    """113 (0x71) counts info events ("Infoevent" in PyKMP and ha-kamstrup_403); the
    info code, the bit field, is 99 (0x63)."""
    assert kmp.REGISTERS[99] == ("info_code", "")
    assert 113 not in kmp.REGISTERS and 113 not in kmp.READ_REGISTERS
    reading = kmp.reading_from(
        {
            113: kmp.Register(113, 0x00, Decimal(7)),
            99: kmp.Register(99, 0x00, Decimal(0x0100)),
            1001: kmp.Register(1001, 0x00, Decimal(30303030)),
        },
        requests=1,
    )
    assert reading.info_code == 0x0100
    assert 113 not in reading.registers
