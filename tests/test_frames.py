"""Layer 1 (EN 13757-2 frames): building short and long frames, checking long frames.

Every frame here is a real one: the Kamstrup captures in corpus/kamstrup and the
libmbus test frames, changed one byte at a time where a test needs a broken frame.
"""

from __future__ import annotations

import pytest

import kamstrup_mbus as mbus
import kamstrup_textfile as k

try:
    from corpus import KAMSTRUP, frames, hex_bytes
except ImportError:  # tests/ imported as a package
    from tests.corpus import KAMSTRUP, frames, hex_bytes

# MULTICAL 303 heat/cooling (address 48): checksum 0x6C.
HEAT_COOLING = hex_bytes(KAMSTRUP / "multical303_heat_cooling.hex")
# MULTICAL 303 heat (address 133).
HEAT = hex_bytes(KAMSTRUP / "multical303_heat.hex")


def with_checksum(frame: bytes) -> bytes:
    """The frame with its checksum recomputed (after a deliberate change in the body)."""
    body = frame[4:-2]
    return frame[:-2] + bytes((sum(body) & 0xFF, frame[-1]))


def with_byte(frame: bytes, index: int, value: int) -> bytes:
    return frame[:index] + bytes((value,)) + frame[index + 1 :]


# --- short frames -----------------------------------------------------------


def test_req_ud2_matches_the_wmbusmeters_capture():
    # "asked with 10 7B 85 00 16" (corpus/kamstrup/README.md): FCB set, address 133.
    assert mbus.req_ud2(0x85, fcb=True) == bytes.fromhex("107B850016")
    assert mbus.req_ud2(0x85, fcb=False) == bytes.fromhex("105B85E016")


def test_snd_nke_to_any_slave():
    assert mbus.snd_nke(0xFE) == bytes.fromhex("1040FE3E16")


@pytest.mark.parametrize("c", [0x40, 0x5B, 0x7B])
@pytest.mark.parametrize("a", [0, 1, 48, 74, 133, 183, 230, 0xFD, 0xFE, 0xFF])
def test_short_frame_layout_and_checksum(c, a):
    frame = mbus.short_frame(c, a)
    assert frame == bytes((0x10, c, a, (c + a) & 0xFF, 0x16))


def test_select_secondary_layout():
    # 68 0B 0B 68 53 FD 52 ID(4, BCD, LSB first) MAN(2) VER MED CS 16 (FIELD-NOTES),
    # manufacturer, version and medium as wildcards.
    frame = mbus.select_secondary("82937133")
    body = bytes.fromhex("53FD5233719382FFFFFFFF")
    assert frame == bytes.fromhex("680B0B68") + body + bytes((sum(body) & 0xFF, 0x16))


# --- long frames: building --------------------------------------------------


@pytest.mark.parametrize("raw", [HEAT, HEAT_COOLING], ids=["303_heat", "303_heat_cooling"])
def test_long_frame_rebuilds_the_captured_bytes(raw):
    frame = mbus.parse_long_frame(raw)
    assert (frame.c, frame.ci) == (0x08, 0x72)
    assert mbus.long_frame(frame.c, frame.a, frame.ci, frame.data) == raw


def test_long_frame_rebuilds_every_libmbus_test_frame():
    for path in frames("test-frames"):
        raw = hex_bytes(path)
        frame = mbus.parse_long_frame(raw)
        assert mbus.long_frame(frame.c, frame.a, frame.ci, frame.data) == raw, path.name


def test_long_frame_body_of_255_bytes_is_the_most():
    assert len(mbus.long_frame(0x08, 1, 0x72, bytes(252))) == 255 + 6
    with pytest.raises(k.FrameError, match="256"):
        mbus.long_frame(0x08, 1, 0x72, bytes(253))


# --- long frames: checking --------------------------------------------------


def test_parse_long_frame_parts():
    frame = mbus.parse_long_frame(HEAT_COOLING)
    assert (frame.c, frame.a, frame.ci) == (0x08, 48, 0x72)
    assert frame.data == HEAT_COOLING[7:-2]
    assert HEAT_COOLING[1] == 0x88
    assert len(frame.data) == 0x88 - 3


def test_checksum_error_names_both_values():
    assert HEAT_COOLING[-2] == 0x6C
    broken = with_byte(HEAT_COOLING, len(HEAT_COOLING) - 2, 0x6B)
    with pytest.raises(k.FrameError, match="checksum 0x6B, expected 0x6C"):
        mbus.parse_long_frame(broken)


def test_checksum_error_on_a_changed_body_byte():
    # One flipped bit in the energy register: the sent checksum no longer fits.
    index = HEAT.index(bytes.fromhex("04060D"))
    broken = with_byte(HEAT, index + 2, 0x0C)
    expected = (HEAT[-2] - 1) & 0xFF
    with pytest.raises(k.FrameError) as info:
        mbus.parse_long_frame(broken)
    assert str(info.value) == f"checksum 0x{HEAT[-2]:02X}, expected 0x{expected:02X}"


def test_length_bytes_differ():
    broken = with_byte(HEAT, 2, HEAT[2] - 1)
    with pytest.raises(k.FrameError, match="length bytes differ: 0x7A and 0x79"):
        mbus.parse_long_frame(broken)


def test_bad_start_bytes():
    for index in (0, 3):
        with pytest.raises(k.FrameError, match="start"):
            mbus.parse_long_frame(with_byte(HEAT, index, 0x10))


@pytest.mark.parametrize("cut", [1, 2, 10, len(HEAT) - 4])
def test_truncated(cut):
    with pytest.raises(k.FrameError, match=f"truncated: {len(HEAT) - cut} of {len(HEAT)}"):
        mbus.parse_long_frame(HEAT[:-cut])


@pytest.mark.parametrize("cut", [len(HEAT) - 3, len(HEAT)])
def test_too_short_for_a_header(cut):
    with pytest.raises(k.FrameError, match="too short"):
        mbus.parse_long_frame(HEAT[:-cut])


@pytest.mark.parametrize("extra", [b"\x16", b"\xe5", b"\x00\x00", HEAT])
def test_trailing_bytes(extra):
    with pytest.raises(k.FrameError, match=f"{len(extra)} bytes after the end"):
        mbus.parse_long_frame(HEAT + extra)


def test_bad_stop_byte():
    broken = with_byte(HEAT, len(HEAT) - 1, 0x17)
    with pytest.raises(k.FrameError, match="stop byte 0x17, expected 0x16"):
        mbus.parse_long_frame(broken)


def test_libmbus_invalid_length_frame():
    # unsupported-frames/invalid_length.hex: 68 00 00 68 08 16, L=0 has no room for C A CI.
    with pytest.raises(k.FrameError, match="too short"):
        mbus.parse_long_frame(bytes.fromhex("680000680816"))


@pytest.mark.parametrize("c", [0x08, 0x18, 0x28, 0x38])
def test_answer_c_fields_accepted(c):
    # RSP_UD, with the ACD (0x20) and DFC (0x10) bits in any combination.
    frame = mbus.parse_long_frame(with_checksum(with_byte(HEAT, 4, c)))
    assert frame.c == c
    assert k.decode_telegram(with_checksum(with_byte(HEAT, 4, c))).id == "82937133"


def test_every_other_c_field_refused():
    for c in set(range(256)) - {0x08, 0x18, 0x28, 0x38}:
        with pytest.raises(k.FrameError, match=f"C field 0x{c:02X}"):
            mbus.parse_long_frame(with_checksum(with_byte(HEAT, 4, c)))


def test_master_frames_are_refused():
    # libmbus unsupported-frames manual_frame4: SND_UD (C=0x53) from the master.
    raw = bytes.fromhex("68060668 53FE51017A08 25 16".replace(" ", ""))
    with pytest.raises(k.FrameError, match="C field 0x53"):
        mbus.parse_long_frame(raw)


# --- long_frame_length ------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_long_frame_length_needs_four_bytes(n):
    assert mbus.long_frame_length(HEAT[:n]) is None


@pytest.mark.parametrize("n", [4, 5, 7, 100, len(HEAT)])
def test_long_frame_length_from_the_header(n):
    assert mbus.long_frame_length(HEAT[:n]) == 0x7A + 6 == len(HEAT)
    assert mbus.long_frame_length(HEAT_COOLING[:n]) == len(HEAT_COOLING)


def test_long_frame_length_of_every_corpus_frame():
    for path in frames("test-frames") + sorted(KAMSTRUP.glob("*.hex")):
        raw = hex_bytes(path)
        assert mbus.long_frame_length(raw[:4]) == len(raw), path.name


@pytest.mark.parametrize(
    "head, message",
    [
        ("687A7968", "length bytes differ: 0x7A and 0x79"),
        ("10 7A 7A 68", "start"),
        ("68 7A 7A 10", "start"),
        ("E5 68 7A 7A", "start"),
        ("68 02 02 68", "too short"),
        ("68 00 00 68", "too short"),
    ],
)
def test_long_frame_length_refuses_impossible_headers(head, message):
    with pytest.raises(k.FrameError, match=message):
        mbus.long_frame_length(bytes.fromhex(head.replace(" ", "")))


def test_long_frame_length_smallest_frame():
    assert mbus.long_frame_length(bytes.fromhex("68030368")) == 9
