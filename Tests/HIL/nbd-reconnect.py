#!/usr/bin/env python3
"""Reconnect daemon for a kernel NBD device attached over netlink (nbd-client without -nonetlink).

nbd-client 3.24 (Debian 12) configures the device through netlink and exits: nothing reconnects
when the server goes away (-persist is ignored in netlink mode; in ioctl mode, -nonetlink, the
6.1 kernel's NBD_DO_IT returns 0 when the server closes the socket, so nbd-client ends instead
of reconnecting, and a second NBD_DO_IT would fail with EBUSY while the filesystem holds the
device open). The kernel itself can survive a server restart: with a dead-connection timeout,
requests that find no live socket wait for one (instead of failing), in-flight requests are
requeued when the request timeout (nbd-client -t) fires, and NBD_CMD_RECONFIGURE with a new
socket replaces the dead one. This script does what nbd-client 3.27's netlink persist mode does:

  1. NBD_CMD_RECONFIGURE sets NBD_ATTR_DEAD_CONN_TIMEOUT on /dev/nbdINDEX,
  2. it listens on the "nbd_mc_group" multicast group for NBD_CMD_LINK_DEAD,
  3. then connects to the UNIX socket again (every 20 ms until a server answers), negotiates
     (fixed newstyle, NBD_OPT_GO of the same export), checks the size and hands the socket to
     the kernel with NBD_CMD_RECONFIGURE + NBD_ATTR_SOCKETS.

Usage: nbd-reconnect.py SOCKET INDEX [--dead-conn-timeout SECONDS] [--export NAME]
Prints one line per event (with a monotonic timestamp) on stdout; ends on SIGTERM/SIGINT."""
import os, signal, socket, struct, sys, time

NETLINK_GENERIC, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 16, 270, 1
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2
GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS = 1, 2, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
NBD_CMD_RECONFIGURE, NBD_CMD_LINK_DEAD = 3, 4
NBD_ATTR_INDEX, NBD_ATTR_SOCKETS, NBD_ATTR_DEAD_CONN_TIMEOUT = 1, 7, 8
NBD_SOCK_ITEM, NBD_SOCK_FD = 1, 1


def log(msg):
    print("%.3f %s" % (time.monotonic(), msg), flush=True)


def attr(kind, payload):
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * ((4 - len(payload) % 4) % 4)


def attrs(data):
    out = {}
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, data[4:length])
        data = data[(length + 3) & ~3:]
    return out


def attr_list(data):
    items = []
    while len(data) >= 4:
        length, _ = struct.unpack_from("=HH", data)
        if length < 4:
            break
        items.append(data[4:length])
        data = data[(length + 3) & ~3:]
    return items


class Genl:
    seq = 1

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))

    def request(self, family, cmd, payload, version=1):
        Genl.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + payload
        self.sock.send(struct.pack("=IHHII", 16 + len(body), family, NLM_F_REQUEST | NLM_F_ACK, Genl.seq, 0) + body)
        reply = None
        while True:
            data = self.sock.recv(65536)
            while len(data) >= 16:
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
                msg, data = data[16:length], data[(length + 3) & ~3:]
                if seq != Genl.seq:
                    continue
                if kind == NLMSG_ERROR:
                    error = struct.unpack_from("=i", msg)[0]
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return reply
                reply = attrs(msg[4:])

    def family(self, name):
        found = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))
        groups = {}
        for group in attr_list(found.get(CTRL_ATTR_MCAST_GROUPS, b"")):
            g = attrs(group)
            groups[g[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()] = struct.unpack("=I", g[CTRL_ATTR_MCAST_GRP_ID])[0]
        return struct.unpack("=H", found[CTRL_ATTR_FAMILY_ID][:2])[0], groups


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        data += chunk
    return data


def negotiate(path, export):
    """Fixed newstyle handshake with NBD_OPT_GO; returns (socket, size, transmission flags)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        magic, opt_magic, flags = struct.unpack(">8sQH", recv_exact(s, 18))
        if magic != b"NBDMAGIC" or opt_magic != 0x49484156454F5054 or not flags & 1:
            raise ConnectionError("not a fixed newstyle NBD server")
        s.sendall(struct.pack(">I", 1 | (flags & 2)))  # FIXED_NEWSTYLE, NO_ZEROES if offered
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)  # NBD_OPT_GO
        size = tflags = None
        while True:
            _, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
            payload = recv_exact(s, length)
            if rtype == 1:  # NBD_REP_ACK
                break
            if rtype & 0x80000000:
                raise ConnectionError("NBD_OPT_GO refused: reply type 0x%x %r" % (rtype, payload[:80]))
            if rtype == 3 and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == 0:  # NBD_INFO_EXPORT
                size, tflags = struct.unpack(">QH", payload[2:12])
        if size is None:
            raise ConnectionError("no NBD_INFO_EXPORT in the reply to NBD_OPT_GO")
        s.settimeout(None)
        return s, size, tflags
    except BaseException:
        s.close()
        raise


def main():
    args = sys.argv[1:]
    dead_timeout, export = 60, ""
    if "--dead-conn-timeout" in args:
        i = args.index("--dead-conn-timeout"); dead_timeout = int(args[i + 1]); del args[i:i + 2]
    if "--export" in args:
        i = args.index("--export"); export = args[i + 1]; del args[i:i + 2]
    path, index = args[0], int(args[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    control = Genl()
    family, groups = control.family("nbd")
    monitor = Genl()
    monitor.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups["nbd_mc_group"])
    control.request(family, NBD_CMD_RECONFIGURE,
                    attr(NBD_ATTR_INDEX, struct.pack("=I", index)) + attr(NBD_ATTR_DEAD_CONN_TIMEOUT, struct.pack("=Q", dead_timeout)))
    _, size, _ = negotiate(path, export)  # the size to insist on after a reconnect (probe connection, closed)
    log("armed: nbd%d dead-conn-timeout %ds, export %r of %d bytes at %s" % (index, dead_timeout, export, size, path))

    while True:
        data = monitor.sock.recv(65536)
        while len(data) >= 16:
            length, kind, _, _, _ = struct.unpack_from("=IHHII", data)
            msg, data = data[16:length], data[(length + 3) & ~3:]
            if kind != family or len(msg) < 4 or msg[0] != NBD_CMD_LINK_DEAD:
                continue
            got = attrs(msg[4:]).get(NBD_ATTR_INDEX)
            if got is None or struct.unpack("=I", got[:4])[0] != index:
                continue
            dead = time.monotonic()
            log("link dead on nbd%d" % index)
            attempts, last_error = 0, None
            while time.monotonic() - dead < dead_timeout:
                attempts += 1
                try:
                    s, new_size, _ = negotiate(path, export)
                except (OSError, ConnectionError) as e:
                    last_error = e
                    time.sleep(0.02)
                    continue
                if new_size != size:
                    log("server now exports %d bytes, not %d: not reconnecting" % (new_size, size))
                    s.close()
                    break
                socks = attr(NBD_ATTR_SOCKETS, attr(NBD_SOCK_ITEM, attr(NBD_SOCK_FD, struct.pack("=I", s.fileno()))))
                try:
                    control.request(family, NBD_CMD_RECONFIGURE, attr(NBD_ATTR_INDEX, struct.pack("=I", index)) + socks)
                except OSError as e:
                    log("NBD_CMD_RECONFIGURE failed: %s" % e)
                    s.close()
                    break
                s.close()  # the kernel holds its own reference
                log("reconnected nbd%d after %.0f ms (%d attempts)" % (index, (time.monotonic() - dead) * 1000, attempts))
                break
            else:
                log("no server within %ds (%d attempts, last: %s)" % (dead_timeout, attempts, last_error))


if __name__ == "__main__":
    main()
