#!/usr/bin/env bash
# HIL acceptance of hot upgrades under load (issue 6): ext4 on `serve blk` through nbd-client with
# a fio crc32c-verifying writer running; 20 upgrades alternating reset and live mode and the two
# builds; fio without error, checksums of a tree written before the first upgrade, fsck clean.
# Then the longest gap between completions seen by a reader across a live and a reset upgrade
# (printed as gap-live-ms / gap-reset-ms), a state format the successor cannot read, and a
# control connection from another uid.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
A=$PWD/.build/debug/virtio-vfio
B=$PWD/.build-variant/debug/virtio-vfio
work=$(mktemp -d)
if [[ ! -x $B ]]; then fail "variant build $B missing (tools/test builds it)"; hil_summary upgrade-under-load; exit 1; fi
va=$($A --version) vb=$($B --version)
vfio-bind bind $BLK >/dev/null && pass "bound blk" || fail "bind"
log=$work/serve.log   # every driver generation logs here (successors inherit the upgrade command's stderr)
upgrade() {
  local bin=$1 mode=$2; shift 2
  OUT=$(timeout 60 $A upgrade $BLK --binary "$bin" --mode "$mode" -- "$@" 2>>"$log"); RC=$?
}
serving_pid() { pgrep -f "virtio-vfio serve blk $BLK" | tail -n1; }

sock=$work/nbd.sock
$A serve blk $BLK --nbd "unix:$sock" 2>>"$log" &
for _ in $(seq 50); do [[ -S $sock && -S /run/virtio-vfio/$BLK.sock ]] && break; sleep 0.1; done
check "nbd-client attaches" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N ""
check "mkfs.ext4 on the export" timeout 60 mkfs.ext4 -q -F /dev/nbd0
mkdir -p "$work/mnt" && check "mount" timeout 20 mount /dev/nbd0 "$work/mnt"
mkdir -p "$work/mnt/tree"
for n in $(seq 40); do head -c $((n * 3000)) /dev/urandom >"$work/mnt/tree/f$n"; done
sync
(cd "$work/mnt/tree" && sha256sum f* >"$work/tree.sums")
# Writes with crc32c headers, and verifies each written block shortly after (verify_backlog).
fio --name=verify --filename="$work/mnt/fio.dat" --size=16M --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
    --direct=1 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --time_based --runtime=900 \
    --output="$work/fio.out" >/dev/null 2>&1 &
fio_pid=$!
sleep 3
info=$(timeout 10 virtio-vfio info $BLK)
[[ $info == *"driver virtio-vfio $va"* && $info == *RING_EVENT_IDX* ]] && pass "info before: driver $va, EVENT_IDX negotiated" || fail "info before: $info"
ok=0
for i in $(seq 20); do
  case $((i % 4)) in 1) bin=$B mode=reset ;; 2) bin=$B mode=live ;; 3) bin=$A mode=reset ;; 0) bin=$A mode=live ;; esac
  upgrade "$bin" $mode
  if [[ $RC == 0 ]]; then ok=$((ok + 1)); else echo "upgrade $i ($mode to $($bin --version)) failed: exit $RC: $OUT"; tail -n 8 "$log"; fi
  kill -0 $fio_pid 2>/dev/null || { echo "fio ended at upgrade $i"; break; }
  if [[ $i == 1 ]]; then
    info=$(timeout 10 virtio-vfio info $BLK)
    [[ $info == *"driver virtio-vfio $vb"* && $info != *RING_EVENT_IDX* ]] && pass "info after: driver $vb, EVENT_IDX not negotiated" || fail "info after: $info"
  fi
  sleep 0.5
done
[[ $ok == 20 ]] && pass "20 upgrades under fio on ext4 (reset/live alternating, $va and $vb alternating)" || fail "$ok of 20 upgrades succeeded"
kill -0 $fio_pid 2>/dev/null && pass "fio ran through all upgrades" || fail "fio ended early: $(tail -n 5 "$work/fio.out")"
kill -INT $fio_pid 2>/dev/null; wait $fio_pid; frc=$?
if grep -qE "err= *0" "$work/fio.out" && ! grep -qiE "verify.*(fail|bad)|crc32c.*(bad|wanted)" "$work/fio.out"; then
  pass "fio: no I/O error and no verify failure ($(grep -oE 'write: IOPS=[^,]*' "$work/fio.out" | head -n1))"
else
  fail "fio: $(grep -E 'err=|verify|crc' "$work/fio.out" | head -n 5)"
fi
(cd "$work/mnt/tree" && sha256sum -c --quiet "$work/tree.sums") && pass "checksums of 40 files written before the first upgrade match" || fail "file tree checksums differ"
for mode in reset live; do
  grep -E "in $mode mode with" "$log" | grep -oE 'service gap [0-9.]+ ms' | grep -oE '[0-9.]+' | sort -n | awk -v m=$mode '
    { v[NR] = $1 } END { if (NR) printf "server-side gap, %s mode, %d upgrades: median %.1f ms, max %.1f ms\n", m, NR, v[int((NR+1)/2)], v[NR] }'
done
check "umount" timeout 30 umount "$work/mnt"
out=$(timeout 120 fsck.ext4 -f -n /dev/nbd0 2>&1) && pass "fsck -f -n clean after 20 upgrades" || fail "fsck: $out"

# ---- the gap a client sees: a reader across one live and one reset upgrade ---------------------
Tests/HIL/gap-probe.py /dev/nbd0 "$work/gaps" &
probe=$!
for _ in $(seq 100); do grep -q ready "$work/gaps" 2>/dev/null && break; sleep 0.1; done
for mode in live reset; do
  kill -USR1 $probe; sleep 0.5; : >"$work/gaps"
  upgrade "$A" $mode
  sleep 1; kill -USR1 $probe; sleep 0.5
  read -r gap errors < <(sed -nE 's/^gap-ms ([0-9.]+) reads [0-9]+ errors ([0-9]+).*/\1 \2/p' "$work/gaps" | tail -n1)
  echo "gap-$mode-ms $gap"
  [[ $RC == 0 && -n $gap && $errors == 0 ]] && pass "a reader saw no error across a $mode upgrade; longest gap $gap ms" || fail "$mode gap: rc $RC, $(cat "$work/gaps")"
done
kill -TERM $probe; wait $probe 2>/dev/null

# ---- a state format the successor cannot read: refused before the device is touched ------------
old=$(serving_pid)
kill -TERM "$old"; for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
$A serve blk $BLK --nbd "unix:$sock" --debug-state-format 99 2>>"$log" &
for _ in $(seq 50); do [[ -S /run/virtio-vfio/$BLK.sock ]] && break; sleep 0.1; done
sleep 0.5
old=$(serving_pid)
upgrade "$B" reset
[[ $RC == 1 && $(serving_pid) == "$old" ]] && pass "a successor refusing the state format leaves pid $old serving" || fail "format refusal: exit $RC: $OUT"
grep -q "state record format 99 is not supported" "$log" && pass "the successor names the unsupported format" || fail "no format refusal in the log"
grep -q "abandoned before the service paused (nothing was touched).*state record format 99" "$log" && ! grep -q "reset and rebuilt" "$log" \
  && pass "refused before the old driver paused: no quiesce, no reset" || fail "format refusal: $(grep -i "format 99" "$log" | head -3)"
check "reads work after the refused upgrade" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N ""
check "read 4 MiB" timeout 20 dd if=/dev/nbd0 of=/dev/null bs=1M count=4 iflag=direct status=none
check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0

# ---- control socket: another uid is refused and logged -----------------------------------------
# The socket is 0600 in a 0700 directory; open both up to reach the SO_PEERCRED check itself.
chmod 0755 /run/virtio-vfio && chmod 0666 /run/virtio-vfio/$BLK.sock
timeout 10 setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c "
import socket, struct
s = socket.socket(socket.AF_UNIX); s.connect('/run/virtio-vfio/$BLK.sock')
try:
    s.sendall(struct.pack('<IB', 1, 7)); print('answer', s.recv(64))
except OSError as e:
    print('closed', e)" >"$work/nobody.out" 2>&1
sleep 0.3
grep -q "refused a connection from uid 65534" "$log" && pass "the control socket refuses uid 65534 and logs it" || fail "no refusal logged: $(tail -n 3 "$log")"
grep -qE "answer b''|closed" "$work/nobody.out" && pass "uid 65534 got no answer (connection closed)" || fail "uid 65534 got: $(cat "$work/nobody.out")"
chmod 0700 /run/virtio-vfio
kill -TERM "$(serving_pid)" 2>/dev/null; wait 2>/dev/null
vfio-bind restore $BLK >/dev/null
echo "--- serve log (tail)"; tail -n 12 "$log"
hil_summary upgrade-under-load
