"""The JSON text the tool prints is exactly the JSON of Telegram.to_json().

telegram_json() builds the text around each value from a per-shape template (for
speed); these tests make sure that is the same document json.dumps would give.
"""

from __future__ import annotations

import json

import pytest

import kamstrup_textfile as kt

try:
    from corpus import KAMSTRUP, LIBMBUS, frames, hex_bytes
except ImportError:  # pragma: no cover - when run as a package
    from tests.corpus import KAMSTRUP, LIBMBUS, frames, hex_bytes

ALL = frames("test-frames") + sorted(KAMSTRUP.glob("*.hex"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_json_text_is_the_json_of_the_telegram(path):
    telegram = kt.decode_telegram(hex_bytes(path))
    text = kt.telegram_json(telegram)
    assert json.loads(text) == json.loads(json.dumps(telegram.to_json()))
    # twice: the second time every record comes from the template cache
    assert kt.telegram_json(telegram) == text


def test_the_same_shape_with_other_values_keeps_each_value():
    first = kt.decode_telegram(hex_bytes(KAMSTRUP / "multical303_heat.hex"))
    second = kt.decode_telegram(hex_bytes(KAMSTRUP / "multical303_heat_cooling.hex"))
    one = json.loads(kt.telegram_json(first))
    two = json.loads(kt.telegram_json(second))
    assert one["records"][0]["value"] == 46800000.0
    assert two["records"][0]["value"] == 554400000.0
    assert one["id"] == "82937133" and two["id"] == "30303030"


def test_fixed_structure_records_do_not_share_a_template():
    telegram = kt.decode_telegram(hex_bytes(LIBMBUS / "test-frames" / "manual_frame2.hex"))
    records = json.loads(kt.telegram_json(telegram))["records"]
    assert [(r["storage"], r["quantity"]) for r in records] == [(0, "volume"), (1, "volume")]


def test_render_json_has_failed_meters_as_errors():
    ok = kt.Reading(48, kt.decode_telegram(hex_bytes(KAMSTRUP / "multical403.hex")))
    failed = kt.Reading(5, error="no answer within 1 s")
    doc = json.loads(kt.render_json([ok, failed]))
    assert doc["meters"][1] == {"address": 5, "error": "no answer within 1 s"}
    assert doc["meters"][0]["id"] == "77447744"
    assert kt.render_json([ok]).endswith("]}\n")
