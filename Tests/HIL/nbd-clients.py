#!/usr/bin/env python3
"""Many NBD clients at once against one export, each checking every byte it reads back.

Usage: nbd-clients.py SOCKET CLIENTS SECONDS [REGION_KIB] [--base-mib N] [--reconnect] [--stop-file PATH]

Each client connects to the UNIX socket, negotiates the fixed newstyle handshake with NBD_OPT_GO
for the default export, and then, for SECONDS, writes a fresh pattern (its id, a counter and
random bytes) to a random block of its own region (REGION_KIB KiB, default 1024, at offset
base + id * region), reads it back and compares it, with a FLUSH every 16 writes. With
--reconnect a client whose connection ends (a driver killed and restarted) connects again (every
50 ms, for up to 120 s) and repeats the write and read it was doing: its region is its own, so
the repeat is harmless and the read still checks every byte. With --stop-file the clients stop
early once PATH exists. A client the server
refuses records the reply type and the server's message. All clients start together (a barrier).
Prints one line per refused client ("refused: TYPE MESSAGE") and a summary:
"clients N served S refused R requests Q verified-bytes B wrong W errors E reconnects C".
Exit 0 when no byte was wrong and no I/O error was answered."""
import argparse, os, random, socket, struct, sys, threading, time

parser = argparse.ArgumentParser(description="Many verifying NBD clients at once.")
parser.add_argument("socket")
parser.add_argument("clients", type=int)
parser.add_argument("seconds", type=float)
parser.add_argument("region_kib", type=int, nargs="?", default=1024)
parser.add_argument("--base-mib", type=int, default=0, help="where client 0's region starts")
parser.add_argument("--reconnect", action="store_true", help="connect again when the connection ends")
parser.add_argument("--stop-file", help="stop once this file exists")
args = parser.parse_args()
path, clients, seconds = args.socket, args.clients, args.seconds
region = args.region_kib * 1024
BLOCK = 4096
INIT_MAGIC, OPT_MAGIC, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3
CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_DISC = 0, 1, 3, 2
barrier = threading.Barrier(clients)
lock = threading.Lock()
totals = {"served": 0, "refused": 0, "requests": 0, "bytes": 0, "wrong": 0, "errors": 0, "reconnects": 0}
refusals = []

def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise EOFError("server closed the connection")
        b += chunk
    return bytes(b)

def handshake(s):
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == INIT_MAGIC and opt == OPT_MAGIC, "bad greeting"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    data = struct.pack(">IH", 0, 0)  # export "", no info requests
    s.sendall(struct.pack(">QII", OPT_MAGIC, OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, option, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, length)
        if rtype == REP_ACK:
            return size, None
        if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]
        elif rtype & 0x80000000:
            return None, (rtype, payload.decode("utf-8", "replace"))

def request(s, cmd, cookie, offset, length, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload)
    magic, error, got = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC and got == cookie, "reply out of step"
    data = recv_exact(s, length) if cmd == CMD_READ and error == 0 else b""
    return error, data

def connect():
    """A connected, negotiated socket and the export size, or the refusal (TYPE, MESSAGE)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(path)
        size, refused = handshake(s)
    except BaseException:
        s.close()
        raise
    if refused:
        s.close()
        return None, None, refused
    return s, size, None

def reconnect():
    """Connects again after a lost connection: every 50 ms for up to 120 s."""
    deadline = time.monotonic() + 120
    while True:
        try:
            s, size, refused = connect()
            if s is not None:
                return s
        except (OSError, EOFError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise EOFError("no server answered for 120 s")
        time.sleep(0.05)

def stopping(end):
    return time.monotonic() >= end or (args.stop_file is not None and os.path.exists(args.stop_file))

def client(i):
    barrier.wait()
    try:
        s, size, refused = connect()
    except Exception as e:
        with lock:
            totals["refused"] += 1
            refusals.append("refused: connection %s" % e)
        return
    if refused:
        with lock:
            totals["refused"] += 1
            refusals.append("refused: 0x%08x %s" % refused)
        return
    base = args.base_mib * 1024 * 1024 + i * region
    assert size is not None and base + region <= size, "export too small for %d clients" % clients
    rng = random.Random(i)
    done = nbytes = wrong = errors = reconnects = 0
    end = time.monotonic() + seconds
    cookie = 0
    while not stopping(end):
        block = rng.randrange(region // BLOCK)
        pattern = struct.pack(">IQ", i, done) + os.urandom(BLOCK - 12)
        while True:
            try:
                cookie += 1
                error, _ = request(s, CMD_WRITE, cookie, base + block * BLOCK, BLOCK, pattern)
                errors += error != 0
                if done % 16 == 15:
                    cookie += 1
                    errors += request(s, CMD_FLUSH, cookie, 0, 0)[0] != 0
                cookie += 1
                error, data = request(s, CMD_READ, cookie, base + block * BLOCK, BLOCK)
                break
            except (OSError, EOFError) as e:
                if not args.reconnect:
                    raise
                s.close()
                try:
                    s = reconnect()
                except EOFError as gone:
                    with lock:
                        totals["errors"] += 1
                        refusals.append("client %d lost the server: %s (after %s)" % (i, gone, e))
                    return
                reconnects += 1
        errors += error != 0
        if error == 0:
            nbytes += len(data)
            wrong += sum(1 for a, b in zip(data, pattern) if a != b)
        done += 1
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
    s.close()
    with lock:
        totals["served"] += 1
        totals["requests"] += done * 2
        totals["bytes"] += nbytes
        totals["wrong"] += wrong
        totals["errors"] += errors
        totals["reconnects"] += reconnects

threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
for r in refusals: print(r)
print("clients %d served %d refused %d requests %d verified-bytes %d wrong %d errors %d reconnects %d" % (
    clients, totals["served"], totals["refused"], totals["requests"], totals["bytes"], totals["wrong"], totals["errors"],
    totals["reconnects"]))
sys.exit(0 if totals["wrong"] == 0 and totals["errors"] == 0 else 1)
