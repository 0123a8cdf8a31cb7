"""An independent KMP client: PyKMP 0.0.2 (PyPI, Apache-2.0) decodes what our simulated
meter sends, and reads through a line that echoes.  Run in PyKMP's own venv
(bench/.venv-pykmp, Python >= 3.10) by test_kmp_pykmp.py, never imported by the tests.

    python pykmp_client.py decode ANSWER_HEX REGISTER...
    python pykmp_client.py echo ANSWER_HEX REGISTER...

Prints one JSON object: {"registers": {id: [unit, "exact decimal"]}} or {"error": name}.
"""

import json
import sys

from pykmp import client, codec, messages


def registers(response) -> dict:
    return {
        str(rid): [reg.unit, str(codec.FloatCodec.decode(reg.value))]
        for rid, reg in response.registers.items()
    }


def decode(answer: bytes, ids: list) -> dict:
    request = client.ClientCodec().encode(messages.GetRegisterRequest(registers=ids))
    frame = client.EncodedClientResponse(physical_bytes=answer, request_cls=request.request_cls)
    return registers(client.ClientCodec().decode(frame=frame))


def echo(answer: bytes, ids: list) -> dict:
    """PyKMP's own serial client on pyserial's loop:// (which reflects what is written,
    as many IR heads do), the meter's answer after the echo."""
    communicator = client.PySerialClientCommunicator(serial_device="loop://", timeout_seconds=0.5)
    write = communicator.write

    def write_then_answer(data):
        write(data)
        communicator._serial.write(answer)

    communicator.write = write_then_answer
    return registers(communicator.send_request(message=messages.GetRegisterRequest(registers=ids)))


def main() -> int:
    what, answer, ids = sys.argv[1], bytes.fromhex(sys.argv[2]), [int(i) for i in sys.argv[3:]]
    try:
        out = {"decode": decode, "echo": echo}[what](answer, ids)
        print(json.dumps({"registers": out}))
    except Exception as exc:  # what PyKMP raises is the point
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
