"""An independent M-Bus master: pyMeterBus 0.8.5 reads one meter, by primary or by
secondary address, and prints what it decoded as JSON.  Run in pyMeterBus's own venv
(bench/.venv-pymeterbus) by test_independent_master.py, never imported by the tests.

    python pymeterbus_master.py PORT primary 48
    python pymeterbus_master.py PORT secondary 82937133FFFFFFFF
"""

import json
import sys

import meterbus
import serial


def main(port: str, how: str, address: str) -> None:
    with serial.Serial(port, 2400, 8, "E", 1, 1.0) as ser:
        if how == "primary":
            meterbus.send_ping_frame(ser, int(address))
            ack = meterbus.recv_frame(ser, 1)
            meterbus.send_request_frame(ser, int(address))
        else:  # pyMeterBus selects with C 0x73 (SND_UD with the FCB set), as libmbus does
            meterbus.send_select_frame(ser, address)
            ack = meterbus.recv_frame(ser, 1)
            meterbus.send_request_frame(ser, meterbus.ADDRESS_NETWORK_LAYER)
        frame = meterbus.load(meterbus.recv_frame(ser, meterbus.FRAME_DATA_LENGTH))
    decoded = json.loads(frame.to_JSON())
    header = decoded["body"]["header"]
    print(
        json.dumps(
            {
                "ack": ack.hex(),
                "id": "".join(b[2:] for b in header["identification"].split(", ")).upper(),
                "manufacturer": header["manufacturer"],
                "values": [record["value"] for record in decoded["body"]["records"]],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
