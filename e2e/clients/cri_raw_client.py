"""A CRI client in Python's grpcio, used by berth's e2e tests as a client berth did not write.

Same line protocol as cri_raw_client.go (see there): raw protobuf bytes in base64, one
command per stdin line, one answer per stdout line.

Usage: cri_raw_client.py SOCKET [AUTHORITY]. Without AUTHORITY grpcio sends its default
for unix: targets ("localhost"); with one, grpc.default_authority sets it (e.g. the
socket path, as older grpc-go clients send).
"""

import base64
import sys

import grpc


def b64(data):
    """Base64, with "-" for no bytes so that every line has all its fields."""
    return base64.b64encode(data).decode() if data else "-"


def unb64(text):
    return b"" if text == "-" else base64.b64decode(text)


def main():
    socket = sys.argv[1]
    options = [("grpc.max_receive_message_length", 16 << 20)]
    if len(sys.argv) > 2:
        options.append(("grpc.default_authority", sys.argv[2]))
    channel = grpc.insecure_channel("unix://" + socket, options=options)
    grpc.channel_ready_future(channel).result(timeout=10)
    for line in sys.stdin:
        f = line.split()
        if len(f) == 3 and f[0] == "unary":
            call = channel.unary_unary(f[1])
            try:
                resp = call(unb64(f[2]), timeout=120)
                print("ok", b64(resp), flush=True)
            except grpc.RpcError as e:
                print("err", e.code().value[0], b64(e.details().encode()), flush=True)
        elif len(f) == 5 and f[0] == "stream":
            call = channel.unary_stream(f[1])
            n, wait = int(f[3]), int(f[4]) / 1000.0
            it = call(unb64(f[2]), timeout=wait)
            got = 0
            try:
                for msg in it:
                    print("msg", b64(msg), flush=True)
                    got += 1
                    if got >= n:
                        it.cancel()
                        break
                if got >= n:
                    print("end", 1, b64(b"enough messages"), flush=True)
                else:
                    print("end", 0, b64(b""), flush=True)
            except grpc.RpcError as e:
                print("end", e.code().value[0], b64((e.details() or "").encode()), flush=True)
        else:
            print("err", 3, b64(b"bad command"), flush=True)


if __name__ == "__main__":
    main()
