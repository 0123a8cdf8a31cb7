"""PyKMP 0.0.2 reads the simulated meter's registers, for bench/run.py's table 6.

Run in bench/.venv-pykmp (PyKMP needs Python >= 3.10).  One GetRegister request per
argument (PyKMP takes up to 8 registers a request), on PyKMP's own pyserial client:
    python pykmp_read.py PORT 60,68,1004,86,87,89,80,74 99,1001
Prints the seconds from opening the port to the last answer decoded (the span
kamstrup_textfile's read_duration_seconds covers) and the number of registers read.
"""

import sys
import time

from pykmp import client, messages


def main() -> int:
    port, batches = sys.argv[1], [[int(i) for i in a.split(",")] for a in sys.argv[2:]]
    start = time.monotonic()
    communicator = client.PySerialClientCommunicator(serial_device=port)
    got = 0
    for ids in batches:
        request = messages.GetRegisterRequest(registers=[messages.RegisterID(i) for i in ids])
        got += len(communicator.send_request(message=request).registers)
    read = time.monotonic() - start
    communicator._serial.close()
    print(f"{read:.6f} {got}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
