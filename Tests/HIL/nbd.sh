#!/usr/bin/env bash
# HIL test of the NBD export of virtio-blk with real clients: nbd-client + ext4 (mkfs, files with
# checksums, fsck, remount), the kernel's virtio-blk seeing the same filesystem after restore,
# nbdinfo, qemu-img convert/compare, fio with crc32c verification, a garbage-sending client, and
# 32 clients at once (all served with --max-clients 64; past the default 16, told why).
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
work=$(mktemp -d)
sock=$work/nbd.sock
uri="nbd+unix:///?socket=$sock"
mnt=$work/mnt; mkdir -p "$mnt"

start_server() {
  virtio-vfio serve blk $BLK --nbd "unix:$sock" "$@" 2>"$work/serve.log" &
  server=$!
  for _ in $(seq 100); do [[ -S $sock ]] && return 0; sleep 0.1; done
  fail "serve blk did not start: $(cat "$work/serve.log")"; return 1
}
stop_server() { kill -TERM "$server" 2>/dev/null; wait "$server"; local rc=$?; cat "$work/serve.log"; return $rc; }

check "bind blk0" vfio-bind bind $BLK >/dev/null
start_server || { hil_summary nbd; exit 1; }

info=$(nbdinfo --json "$uri")
[[ $(jq -r '.exports[0]["export-size"]' <<<"$info") == 268435456 ]] && pass "nbdinfo: size 268435456" || fail "nbdinfo size: $info"
[[ $(jq -r '.exports[0]["is_read_only"]' <<<"$info") == false ]] && pass "nbdinfo: writable" || fail "nbdinfo read-only flag"
[[ $(jq -r '.exports[0]["can_flush"]' <<<"$info") == true ]] && pass "nbdinfo: can flush" || fail "nbdinfo can_flush"
[[ $(jq -r '.exports[0]["can_trim"]' <<<"$info") == true ]] && pass "nbdinfo: can trim (DISCARD negotiated)" || fail "nbdinfo can_trim"
[[ $(jq -r '.exports[0]["block_size_minimum"]' <<<"$info") == 512 ]] && pass "nbdinfo: minimum block size 512" || fail "nbdinfo block sizes: $info"

# ext4 through the kernel's nbd client.
check "nbd-client attaches the export" nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" >/dev/null 2>&1
check "mkfs.ext4 on /dev/nbd0" mkfs.ext4 -q -F /dev/nbd0
check "mount" mount /dev/nbd0 "$mnt"
mkdir -p "$mnt/tree/a/b"
for i in $(seq 1 40); do head -c $((RANDOM * 8 + i)) /dev/urandom >"$mnt/tree/a/file$i"; done
cp /opt/swift/usr/lib/swift/linux/libswiftCore.so "$mnt/tree/a/b/"
(cd "$mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/sums"
check "sync" sync
check "umount" umount "$mnt"
check "fsck.ext4 -f -n is clean" fsck.ext4 -f -n /dev/nbd0
check "mount again" mount /dev/nbd0 "$mnt"
(cd "$mnt" && sha256sum --quiet -c "$work/sums") && pass "41 files' checksums match after remount" || fail "checksums differ after remount"
check "umount" umount "$mnt"
check "nbd-client disconnects" nbd-client -d /dev/nbd0 >/dev/null 2>&1
stop_server && pass "serve blk stops cleanly on SIGTERM" || fail "serve blk exit status"

# The same filesystem through the kernel's virtio-blk driver.
check "restore blk0 to the kernel" vfio-bind restore $BLK >/dev/null
sleep 0.5
kdev=/dev/$(ls /sys/bus/pci/devices/$BLK/virtio*/block | head -n1)
check "kernel virtio-blk: fsck clean" fsck.ext4 -f -n "$kdev"
check "kernel virtio-blk: mount" mount -o ro "$kdev" "$mnt"
(cd "$mnt" && sha256sum --quiet -c "$work/sums") && pass "kernel virtio-blk sees the same 41 files" || fail "kernel sees different data"
umount "$mnt"

# qemu-img: convert a reference image into the export and compare.
check "bind blk0 again" vfio-bind bind $BLK >/dev/null
start_server --irq poll || { hil_summary nbd; exit 1; }
ref=$work/ref.img
truncate -s 256M "$ref"
for off in 0 7 33 100 255; do head -c $((1 << 20)) /dev/urandom | dd of="$ref" bs=1M seek=$off conv=notrunc status=none; done
check "qemu-img convert -n into the export" qemu-img convert -n -f raw -O raw "$ref" "$uri"
check "qemu-img compare: export equals the reference" qemu-img compare -f raw -F raw "$ref" "$uri"
check "nbdcopy back out" nbdcopy "$uri" "$work/copy.img"
cmp -s "$ref" "$work/copy.img" && pass "nbdcopy copy equals the reference" || fail "nbdcopy copy differs"
rm -f "$work/copy.img"

# fio with verification, through nbd-client, random read/write.
check "nbd-client attaches again" nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" >/dev/null 2>&1
fio --name=verify --filename=/dev/nbd0 --rw=randrw --bs=4k --size=48M --direct=1 --ioengine=libaio --iodepth=16 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse >"$work/fio.out" 2>&1 \
  && pass "fio randrw with crc32c verification passes" || fail "fio verify: $(tail -n 5 "$work/fio.out")"
check "nbd-client disconnects" nbd-client -d /dev/nbd0 >/dev/null 2>&1

# A client sending garbage is dropped; the server keeps serving others.
python3 - "$sock" <<'PY' && pass "a garbage-sending client is disconnected" || fail "garbage client"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)
s.recv(18); s.sendall(b"\x00\x00\x00\x03" + b"garbage!" * 8)
data = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
except socket.timeout:
    sys.exit(1)
PY
[[ $(nbdinfo --size "$uri") == 268435456 ]] && pass "the server still answers other clients" || fail "server dead after garbage"
stop_server >/dev/null || true

# 32 clients at once, each writing its own data and checking every byte it reads back: all served
# with --max-clients 64; with the default limit (16) the other 16 are told why (NBD_REP_ERR_POLICY).
start_server --max-clients 64 || { hil_summary nbd; exit 1; }
out=$(timeout 120 python3 Tests/HIL/nbd-clients.py "$sock" 32 5); rc=$?
echo "  --max-clients 64: $(tail -n 1 <<<"$out")"
[[ $rc == 0 && $out == *"served 32 refused 0"*"wrong 0 errors 0"* ]] && pass "32 clients at once with --max-clients 64: all served, every byte verified" \
  || fail "32 clients, --max-clients 64: exit $rc: $out"
stop_server >/dev/null || true
start_server || { hil_summary nbd; exit 1; }
out=$(timeout 120 python3 Tests/HIL/nbd-clients.py "$sock" 32 5); rc=$?
echo "  default limit: $(tail -n 1 <<<"$out")"
told=$(grep -c "refused: 0x80000002 server busy: 16 clients are being served, the most this export takes (virtio-vfio serve blk --max-clients)" <<<"$out")
[[ $rc == 0 && $out == *"served 16 refused 16"*"wrong 0 errors 0"* && $told == 16 ]] \
  && pass "32 clients with the default limit: 16 served and verified, 16 told why (NBD_REP_ERR_POLICY: $(grep -m1 -o 'server busy[^;]*' <<<"$out"))" \
  || fail "32 clients, default limit: exit $rc, $told told why: $out"
stop_server >/dev/null 2>&1 || true
logged=$(grep -c "refusing connection [0-9]*: 16 clients are being served (the limit); it is told so" "$work/serve.log")
[[ $logged == 16 ]] && pass "the server logged each of the 16 refusals with its count" || fail "refusals logged: $logged; $(grep refusing "$work/serve.log" | head -n 3)"
check "restore blk0" vfio-bind restore $BLK >/dev/null
rm -rf "$work"
hil_summary nbd
