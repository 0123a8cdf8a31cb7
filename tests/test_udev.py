"""Checks of 10-usbports.rules, the udev rule for a stable /dev/ttymeterBus.

Debian 12's udev (252) has no `udevadm verify` (it came with systemd 254), so
the rule is checked two ways: udev's own rules parser reads it (`udevadm test`
in a private mount namespace, with the rule bound over /etc/udev/rules.d and
tmpfs over /dev and /run so nothing touches the host), and a small parser here
checks each line's KEY OP "VALUE" pairs and what the rule matches.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from pathlib import Path

import pytest

try:
    from tools import ROOT, require_tool
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, require_tool

RULES = ROOT / "10-usbports.rules"
SERVICE = ROOT / "kamstrup.service"

MATCH_ONLY = {
    "ACTION",
    "DEVPATH",
    "KERNEL",
    "KERNELS",
    "SUBSYSTEM",
    "SUBSYSTEMS",
    "DRIVER",
    "DRIVERS",
    "TAGS",
    "TEST",
    "PROGRAM",
    "RESULT",
}
MATCH_ONLY_BRACED = {"ATTRS", "SYSCTL", "CONST"}
ASSIGN_ONLY = {
    "OWNER",
    "GROUP",
    "MODE",
    "LABEL",
    "GOTO",
    "RUN",
    "IMPORT",
    "OPTIONS",
    "SECLABEL",
    "WAIT_FOR",
}
EITHER = {"NAME", "SYMLINK", "TAG"}
EITHER_BRACED = {"ATTR", "ENV"}
MATCH_OPS = {"==", "!="}
ASSIGN_OPS = {"=", "+=", "-=", ":="}

PAIR = re.compile(
    r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)'
)


def parse_rule_line(line: str) -> list[tuple[str, str | None, str, str]]:
    """[(KEY, attribute or None, OP, VALUE)] of one rule line; ValueError if malformed."""
    pairs = []
    pos = 0
    while pos < len(line):
        m = PAIR.match(line, pos)
        if not m:
            raise ValueError(f"malformed at column {pos}: {line[pos:]!r}")
        key, attr, op, value, sep = m.groups()
        braced = attr is not None
        if braced and key not in MATCH_ONLY_BRACED | EITHER_BRACED:
            raise ValueError(f"unknown key {key}{{{attr}}}")
        if not braced and key not in MATCH_ONLY | ASSIGN_ONLY | EITHER:
            raise ValueError(f"unknown key {key}")
        if key in MATCH_ONLY | MATCH_ONLY_BRACED and op not in MATCH_OPS:
            raise ValueError(f"{key} can only be matched (== or !=), not {op}")
        if key in ASSIGN_ONLY and op not in ASSIGN_OPS:
            raise ValueError(f"{key} can only be assigned, not matched with {op}")
        pairs.append((key, attr, op, value))
        pos = m.end()
        if sep == "" and pos < len(line):
            raise ValueError(f"missing comma at column {pos}")
    if not pairs:
        raise ValueError("empty rule")
    return pairs


def parse_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rules.append(parse_rule_line(line))
    return rules


def symlinks_for(rules, chain: list[dict]) -> list[str]:
    """SYMLINK names the rules give a tty device.

    chain[0] is the device itself ({"SUBSYSTEM":..., "KERNEL":..., "attrs": {...}}),
    chain[1:] its parents. As in udev, all the *S keys (ATTRS, KERNELS,
    SUBSYSTEMS, DRIVERS) of one rule must match on one and the same device of
    the chain; plain keys match the device itself.
    """
    links: list[str] = []
    for rule in rules:
        device = chain[0]
        ok = True
        for key, _attr, op, value in rule:
            if op not in MATCH_OPS or key not in ("SUBSYSTEM", "KERNEL", "ACTION"):
                continue
            hit = fnmatch.fnmatchcase(device.get(key, ""), value)
            ok &= hit if op == "==" else not hit
        parent_keys = [
            (k, a, op, v)
            for k, a, op, v in rule
            if k in ("ATTRS", "KERNELS", "SUBSYSTEMS", "DRIVERS")
        ]

        def on(dev, parent_keys=parent_keys):
            for key, attr, op, value in parent_keys:
                actual = dev["attrs"].get(attr) if key == "ATTRS" else dev.get(key[:-1])
                hit = actual is not None and fnmatch.fnmatchcase(actual, value)
                if hit != (op == "=="):
                    return False
            return True

        if parent_keys:
            ok &= any(on(dev) for dev in chain)
        if ok:
            for key, _attr, op, value in rule:
                if key == "SYMLINK" and op in ("=", "+=", ":="):
                    links.extend(value.split())
    return links


def usb_serial_chain(vendor: str, product: str, serial: str) -> list[dict]:
    """Device chain of a USB serial adapter as `udevadm info -a -n /dev/ttyUSB0` shows it."""
    return [
        {"SUBSYSTEM": "tty", "KERNEL": "ttyUSB0", "attrs": {}},
        {
            "SUBSYSTEM": "usb-serial",
            "KERNEL": "ttyUSB0",
            "DRIVER": "ftdi_sio",
            "attrs": {"port_number": "0"},
        },
        {
            "SUBSYSTEM": "usb",
            "KERNEL": "1-1.3:1.0",
            "DRIVER": "ftdi_sio",
            "attrs": {"bInterfaceNumber": "00"},
        },
        {
            "SUBSYSTEM": "usb",
            "KERNEL": "1-1.3",
            "DRIVER": "usb",
            "attrs": {
                "idVendor": vendor,
                "idProduct": product,
                "serial": serial,
                "product": "FT232R USB UART",
            },
        },
        {
            "SUBSYSTEM": "usb",
            "KERNEL": "1-1",
            "DRIVER": "usb",
            "attrs": {"idVendor": "0424", "idProduct": "9514", "product": "USB 2.0 Hub"},
        },
    ]


def rule_values(rule, key, attr=None, ops=None):
    return [v for k, a, op, v in rule if k == key and a == attr and (ops is None or op in ops)]


# --------------------------------------------------------------------------
# udev's own parser


def udev_messages(tmp_path: Path, text: str) -> tuple[list[str], str]:
    """Lines udev logs about our rules file while it reads all rules."""
    for tool in ("udevadm", "unshare", "mount"):
        require_tool(tool)
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "10-usbports.rules").write_text(text)
    ttys = sorted(os.listdir("/sys/class/tty")) if os.path.isdir("/sys/class/tty") else []
    assert ttys, "no device in /sys/class/tty to run `udevadm test` on"
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs none /run; mount -t tmpfs none /dev; "
        f"mount --bind '{rules_dir}' /etc/udev/rules.d; exec udevadm test /sys/class/tty/{ttys[0]}"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr
    assert "Reading rules file: /etc/udev/rules.d/10-usbports.rules" in out, out[-3000:]
    ours = [
        line for line in out.splitlines() if line.startswith("/etc/udev/rules.d/10-usbports.rules:")
    ]
    return ours, out


def test_udev_parses_the_rule_without_a_complaint(tmp_path):
    messages, _ = udev_messages(tmp_path, RULES.read_text())
    assert messages == []


def test_udev_check_catches_a_broken_rule(tmp_path):
    broken = RULES.read_text().replace('ATTRS{idVendor}=="', 'ATTRS{idVendor}="')
    assert broken != RULES.read_text()
    messages, _ = udev_messages(tmp_path, broken)
    assert messages, "udev should complain about ATTRS with an assignment"


# --------------------------------------------------------------------------
# our parser


def test_every_rule_line_is_well_formed():
    rules = parse_rules(RULES.read_text())
    assert len(rules) == 1


@pytest.mark.parametrize(
    "line",
    [
        # an assignment to a match-only key
        'SUBSYSTEM=="tty", ATTRS{idVendor}="0403", SYMLINK+="ttymeterBus"',
        'SUBSYSTEM=="tty" ATTRS{idVendor}=="0403"',  # missing comma
        'SUBSYSTEM=="tty", ATTRS{idVendor}==0403',  # value without quotes
        'SUBSYTEM=="tty", SYMLINK+="ttymeterBus"',  # misspelt key
        'SUBSYSTEM=="tty", GROUP=="dialout"',  # GROUP is assign-only
    ],
)
def test_parser_rejects_malformed_lines(line):
    with pytest.raises(ValueError):
        parse_rule_line(line)


def test_rule_names_the_ftdi_adapter_by_vendor_product_and_serial():
    (rule,) = parse_rules(RULES.read_text())
    assert rule_values(rule, "SUBSYSTEM", ops=MATCH_OPS) == ["tty"]
    assert rule_values(rule, "ATTRS", "idVendor", MATCH_OPS) == ["0403"]
    assert rule_values(rule, "ATTRS", "idProduct", MATCH_OPS) == ["6001"]
    (serial,) = rule_values(rule, "ATTRS", "serial", MATCH_OPS)
    assert re.fullmatch(r"[A-Za-z0-9]+", serial)
    assert rule_values(rule, "SYMLINK", ops=ASSIGN_OPS) == ["ttymeterBus"]
    assert rule_values(rule, "GROUP", ops=ASSIGN_OPS) == ["dialout"]
    assert rule_values(rule, "MODE", ops=ASSIGN_OPS) == ["0660"]


def test_rule_links_only_the_adapter_with_that_serial():
    rules = parse_rules(RULES.read_text())
    (serial,) = rule_values(rules[0], "ATTRS", "serial")
    assert symlinks_for(rules, usb_serial_chain("0403", "6001", serial)) == ["ttymeterBus"]
    # a second FTDI cable with another serial number, and a Prolific adapter
    assert symlinks_for(rules, usb_serial_chain("0403", "6001", serial + "X")) == []
    assert symlinks_for(rules, usb_serial_chain("067b", "2303", serial)) == []
    # the USB interface itself (not a tty) gets no link
    chain = usb_serial_chain("0403", "6001", serial)
    assert symlinks_for(rules, chain[2:]) == []


def test_comments_tell_how_to_find_the_values():
    text = RULES.read_text()
    assert "udevadm info -a -n /dev/ttyUSB0" in text
    assert "ls -l /dev/serial/by-id/" in text


def test_service_allows_the_linked_device():
    (rule,) = parse_rules(RULES.read_text())
    (link,) = rule_values(rule, "SYMLINK", ops=ASSIGN_OPS)
    assert f"DeviceAllow=/dev/{link} rw" in SERVICE.read_text().splitlines()
