"""The least a read can do: SND_NKE, REQ_UD2, the answer read by its length byte.

The yardstick for kamstrup_textfile's own read (bench/run.py): pyserial and
nothing else, no decoding, no retries, no output.
    python3 minimal_read.py PORT ADDRESS
"""

import sys

import serial


def main() -> None:
    port, address = sys.argv[1], int(sys.argv[2])
    with serial.Serial(port, 2400, serial.EIGHTBITS, serial.PARITY_EVEN, 1, timeout=2) as line:
        line.write(bytes((0x10, 0x40, address, (0x40 + address) & 0xFF, 0x16)))
        if line.read(1) != b"\xe5":
            sys.exit("no E5")
        line.write(bytes((0x10, 0x7B, address, (0x7B + address) & 0xFF, 0x16)))
        head = line.read(4)
        body = line.read(head[1] + 2)
        if len(body) != head[1] + 2:
            sys.exit("short answer")
        print(len(head) + len(body))


if __name__ == "__main__":
    main()
