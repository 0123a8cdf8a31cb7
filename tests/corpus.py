"""The frame corpora in tests/data (data only, never copied code; see tests/data/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
LIBMBUS = DATA / "libmbus"
KAMSTRUP = DATA / "kamstrup"


def hex_bytes(path: Path) -> bytes:
    """Every hex digit in the file, paired (libmbus reads .hex files this way)."""
    digits = "".join(re.findall(r"[0-9A-Fa-f]", path.read_text(encoding="latin-1")))
    return bytes.fromhex(digits)


def frames(folder: str) -> list[Path]:
    return sorted((LIBMBUS / folder).glob("*.hex"))


_RECORD = re.compile(r'<DataRecord id="(\d+)">(.*?)</DataRecord>', re.S)
_FIELD = re.compile(r"<(\w+)>(.*?)</\1>", re.S)


def norm_records(path: Path) -> list[dict]:
    """The DataRecords of a libmbus .norm.xml as dicts of their fields (UTF-8 text)."""
    text = path.read_text(encoding="utf-8")
    out = []
    for _, body in _RECORD.findall(text):
        fields = {name: value.replace("&amp;", "&") for name, value in _FIELD.findall(body)}
        out.append(fields)
    return out


def slave_information(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    block = re.search(r"<SlaveInformation>(.*?)</SlaveInformation>", text, re.S)
    return dict(_FIELD.findall(block.group(1))) if block else {}
