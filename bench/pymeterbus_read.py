"""pyMeterBus 0.8.5 reading one meter as its README shows (run in its own venv).

python pymeterbus_read.py PORT ADDRESS        # one read, JSON on stdout
python pymeterbus_read.py --decode SECONDS HEXFILE...  # frames/s of load + to_JSON
"""

import sys
import time

import meterbus
import serial


def read(port: str, address: int) -> None:
    with serial.Serial(port, 2400, 8, "E", 1, 0.5) as ser:
        meterbus.send_ping_frame(ser, address)
        meterbus.load(meterbus.recv_frame(ser, 1))
        meterbus.send_request_frame(ser, address)
        frame = meterbus.load(meterbus.recv_frame(ser, meterbus.FRAME_DATA_LENGTH))
        print(frame.to_JSON())


def decode(seconds: float, paths: list) -> None:
    frames = []
    for path in paths:
        with open(path, encoding="latin-1") as f:
            digits = "".join(c for c in f.read() if c in "0123456789abcdefABCDEF")
        frames.append(bytes.fromhex(digits))
    usable = []
    indices = []
    for index, frame in enumerate(frames):
        try:
            meterbus.load(frame).to_JSON()
            usable.append(frame)
            indices.append(str(index))
        except Exception:  # pyMeterBus cannot decode every frame; count what it can
            pass
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for frame in usable:
            meterbus.load(frame).to_JSON()
        count += len(usable)
    elapsed = time.perf_counter() - start
    print(f"{count / elapsed:.1f} {len(usable)} {len(frames)} {','.join(indices)}")


if __name__ == "__main__":
    if sys.argv[1] == "--decode":
        decode(float(sys.argv[2]), sys.argv[3:])
    else:
        read(sys.argv[1], int(sys.argv[2]))
