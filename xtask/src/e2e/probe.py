"""The e2e app container's probe (`cargo xtask e2e` runs it with `podman exec app probe ...`).

Each command prints one line the e2e matches on:
  connect ADDR PORT     ok <HTTP status line> | errno <NAME> | error <text>
  fetch NAME PORT       resolves NAME (getaddrinfo, through the pod's resolv.conf), then as connect
  resolve NAME          rcode <NAME> [addresses...] | timeout: one A query, raw, to resolv.conf's server
  packet                ok | errno <NAME>: opens an AF_PACKET socket
  hold-packet SECONDS   opens an AF_PACKET socket, prints `holding`, keeps it open
  packet-send IFACE     opens an AF_PACKET socket and sends a broadcast frame on IFACE
  vsock                 ok | errno <NAME>: opens an AF_VSOCK socket (needs no capability)
  first                 the app's first instruction: `first ` + connect 198.51.100.20 80, then idles
"""

import errno
import random
import socket
import struct
import sys
import time

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def err(e: OSError) -> str:
    return "errno " + errno.errorcode.get(e.errno or 0, str(e.errno))


def connect(addr: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: e2e\r\n\r\n")
        data = s.recv(4096)
        return "ok " + data.split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError as e:
        return err(e) if e.errno else "error " + str(e)
    finally:
        s.close()


def fetch(name: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return "gaierror " + str(e)
    return connect(infos[0][4][0], port)


def nameserver() -> str:
    with open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    return "127.0.0.1"


def resolve(name: str) -> str:
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(q, (nameserver(), 53))
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return err(e)
    finally:
        s.close()
    rcode = RCODES.get(data[3] & 0x0F, str(data[3] & 0x0F))
    ancount = struct.unpack("!H", data[6:8])[0]
    # Skip the question, then read A records (compressed names only: 2 bytes).
    i = len(q)
    addrs = []
    for _ in range(ancount):
        rtype, _, _, rdlen = struct.unpack("!HHIH", data[i + 2 : i + 12])
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[i + 12 : i + 16]))
        i += 12 + rdlen
    return " ".join(["rcode", rcode] + addrs)


def packet() -> socket.socket:
    return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "connect":
        print(connect(argv[1], int(argv[2])))
    elif cmd == "fetch":
        print(fetch(argv[1], int(argv[2])))
    elif cmd == "resolve":
        print(resolve(argv[1]))
    elif cmd == "packet":
        try:
            packet().close()
            print("ok")
        except OSError as e:
            print(err(e))
    elif cmd == "packet-send":
        try:
            s = packet()
            s.bind((argv[1], 0))
            # Broadcast, from a made-up address, an IPv4 ethertype and a payload.
            frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + b"probe\n" * 8
            s.send(frame)
            s.close()
            print("ok")
        except OSError as e:
            print(err(e))
    elif cmd == "vsock":
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
            print("ok")
        except OSError as e:
            print(err(e))
    elif cmd == "hold-packet":
        try:
            s = packet()
        except OSError as e:
            print(err(e), flush=True)
            return 1
        print("holding", flush=True)
        time.sleep(int(argv[1]))
        s.close()
    elif cmd == "first":
        print("first " + connect("198.51.100.20", 80), flush=True)
        while True:
            time.sleep(3600)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
