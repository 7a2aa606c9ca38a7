#!/usr/bin/env bash
# HIL test of crash recovery of `serve blk`: kill -9 of the serving driver while ext4 on the kernel
# NBD client is busy (fio with crc32c verification, a reader measuring the gap), a fresh serve on
# the same device and socket (it opens the group again and resets the device), the kernel client
# reconnects, no I/O error reaches fio or ext4, checksums match, fsck is clean.
#
# The client: nbd-client 3.24 (Debian 12) cannot reconnect by itself on 6.1. In ioctl mode
# (-nonetlink -persist) NBD_DO_IT returns 0 when the server's socket closes, nbd-client prints
# "Kernel call returned." and ends (it reconnects only on an ioctl error), requests fail with EIO
# and ext4 aborts its journal; in netlink mode (the default) it configures the device and exits,
# -persist is ignored. So nbd-client attaches over netlink with a request timeout (-t: in-flight
# requests to a dead server are requeued when it fires, not failed), and Tests/HIL/nbd-reconnect.py
# sets the kernel's dead-connection timeout (new requests wait for a socket instead of failing),
# waits for NBD_CMD_LINK_DEAD and hands the kernel a socket to the new server (NBD_CMD_RECONFIGURE),
# which is what nbd-client 3.27 does in its netlink persist mode. Every command is bounded by
# `timeout`, so a hang fails a check instead of the run.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
REQUEST_TIMEOUT=${CRASH_REQUEST_TIMEOUT:-3}   # nbd-client -t: seconds before an unanswered request is requeued
DEAD_TIMEOUT=60                               # how long requests wait for a new server
work=$(mktemp -d)
sock=$work/nbd.sock
mnt=$work/mnt; mkdir -p "$mnt"
dmesg -n 1   # the expected "Receive control failed" on the console is noise; dmesg is checked below
dmesg_before=$(dmesg | wc -l)

# start_server LOG: serve blk in the background, $server its pid; waits until it exports
# (bounded), $startup_ms is how long that took.
start_server() {
  local start=$(date +%s%N)
  virtio-vfio serve blk $BLK --nbd "unix:$sock" --verbose 2>"$1" &
  server=$!
  for _ in $(seq 400); do
    if grep -q "exporting" "$1" 2>/dev/null; then startup_ms=$((($(date +%s%N) - start) / 1000000)); return 0; fi
    kill -0 $server 2>/dev/null || break; sleep 0.05
  done
  fail "serve blk did not start: $(cat "$1")"; return 1
}
finish() { hil_summary crash; exit; }

check "bind blk0" vfio-bind bind $BLK >/dev/null
start_server "$work/serve1.log" || finish
echo "  first serve exporting after $startup_ms ms"
check "nbd-client attaches over netlink with -t $REQUEST_TIMEOUT" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" -t $REQUEST_TIMEOUT
python3 Tests/HIL/nbd-reconnect.py "$sock" 0 --dead-conn-timeout $DEAD_TIMEOUT >"$work/reconnect.log" 2>&1 &
helper=$!
for _ in $(seq 100); do grep -qs armed "$work/reconnect.log" && break; sleep 0.1; done
grep -q armed "$work/reconnect.log" && pass "reconnect helper armed (dead-conn-timeout ${DEAD_TIMEOUT}s, listening for LINK_DEAD)" || { fail "reconnect helper: $(cat "$work/reconnect.log")"; finish; }

check "mkfs.ext4 on /dev/nbd0" timeout 60 mkfs.ext4 -q -F /dev/nbd0
check "mount" timeout 30 mount /dev/nbd0 "$mnt"
mkdir -p "$mnt/tree/a/b"
for i in $(seq 1 30); do head -c $((RANDOM * 4 + i)) /dev/urandom >"$mnt/tree/a/file$i"; done
cp /opt/swift/usr/lib/swift/linux/libswiftCore.so "$mnt/tree/a/b/"
(cd "$mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/sums"
check "sync the file tree" timeout 60 sync

# fio: random 4 KiB writes with crc32c in every block, then a verify pass reading them all back.
timeout 300 fio --name=crash --filename="$mnt/fio.dat" --size=24M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$work/fio.out" >/dev/null 2>&1 &
fio=$!
python3 Tests/HIL/gap-probe.py /dev/nbd0 "$work/gap.out" &
probe=$!
sleep 3
kill -0 $fio 2>/dev/null && pass "fio is running when the server is killed" || fail "fio ended before the kill: $(tail -n 5 "$work/fio.out")"

pid1=$server
t0=$(date +%s%N)
kill -9 $pid1; wait $pid1 2>/dev/null
sleep 1
start_server "$work/serve2.log" || finish
t1=$(date +%s%N)
echo "  serve killed with SIGKILL; new serve (pid $server) started $(((t1 - t0) / 1000000 - startup_ms)) ms later, exporting after $startup_ms ms"
for _ in $(seq 300); do grep -q "reconnected" "$work/reconnect.log" && break; sleep 0.1; done
grep -q "reconnected" "$work/reconnect.log" && pass "the kernel NBD client reconnected: $(grep -o 'reconnected.*' "$work/reconnect.log" | head -n1)" \
  || fail "no reconnect: $(cat "$work/reconnect.log")"
# serve blk logs no reset line: "exporting ... features [...]" after a crash means it reset the
# device (the only way to renegotiate one left with FEATURES_OK, see below) and brought it up.
grep -q "exporting .*features \[.*VERSION_1" "$work/serve2.log" && pass "the new serve opened the group again, reset and renegotiated the device, exports it" \
  || fail "serve2 log: $(cat "$work/serve2.log")"
grep -q "client 0 entered transmission" "$work/serve2.log" && pass "the new serve accepted the reconnecting client (fixed newstyle, NBD_OPT_GO of export \"\")" \
  || fail "serve2 log shows no client: $(cat "$work/serve2.log")"

# The reader ran from 3 s before the kill; its longest wait between two completed reads is the
# cold-restart gap a client sees (normal gaps are tens of milliseconds).
sleep 2
kill -TERM $probe 2>/dev/null; wait $probe 2>/dev/null
gap=$(tail -n 1 "$work/gap.out")
gap_ms=$(awk '{printf "%d", $2}' <<<"$gap")
echo "cold-restart-gap-ms $gap_ms"
[[ $gap == *"errors 0" && $gap_ms -gt 0 ]] && pass "the reader saw no error through the restart ($gap)" || fail "reader: $gap"
if timeout 300 tail --pid=$fio -f /dev/null; wait $fio; then rc=0; else rc=$?; fi
[[ $rc == 0 ]] && grep -q "err= 0" "$work/fio.out" && pass "fio completed its crc32c verify pass with no error" \
  || fail "fio exit $rc: $(grep -E 'err=|verify|error' "$work/fio.out" | head -n 5)"
grep -E "^ +(write|read):" "$work/fio.out" | sed 's/^ */  fio /'

(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "the file tree's checksums match after the crash" || fail "checksums differ after the crash"
check "umount" timeout 60 umount "$mnt"
check "fsck.ext4 -f -n is clean" timeout 120 fsck.ext4 -f -n /dev/nbd0
dmesg | tail -n +$((dmesg_before + 1)) >"$work/dmesg"
grep -q "reconnected socket" "$work/dmesg" && pass "dmesg: nbd0 reconnected socket" || fail "no 'reconnected socket' in dmesg"
if grep -qE "I/O error|EXT4-fs (error|warning)|Aborting journal|Buffer I/O" "$work/dmesg"; then
  fail "dmesg has I/O or ext4 errors: $(grep -E 'I/O error|EXT4-fs|journal|Buffer I/O' "$work/dmesg" | head -n 5)"
else pass "dmesg: no I/O error, no ext4 error"; fi
echo "--- dmesg (nbd)"; grep -E "nbd0" "$work/dmesg" | head -n 12

check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
kill -TERM $helper 2>/dev/null; wait $helper 2>/dev/null

# Once more without clients, to see what a killed driver leaves in the device: VFIO cannot reset
# this function (no FLR on the root bus) and QEMU only drops DRIVER_OK when bus mastering goes
# off, so the status is not 0 and the next driver must reset before it can negotiate.
kill -9 $server; wait $server 2>/dev/null
left=$(timeout 20 virtio-vfio info $BLK 2>&1 | sed -n 's/^Status: //p')
[[ -n $left && $left != 0* ]] && pass "a killed driver leaves the device un-reset (status $left)" || fail "status after kill -9: '$left'"
start_server "$work/serve3.log" || finish
grep -q "exporting .*features \[.*VERSION_1" "$work/serve3.log" && pass "a fresh serve resets and renegotiates it ($startup_ms ms to exporting)" || fail "serve3: $(cat "$work/serve3.log")"
[[ $(timeout 30 nbdinfo --size "nbd+unix:///?socket=$sock") == 268435456 ]] && pass "and serves it (nbdinfo)" || fail "nbdinfo after the second restart"
kill -TERM $server 2>/dev/null
if timeout 30 tail --pid=$server -f /dev/null; wait $server; then pass "serve stops cleanly on SIGTERM"; else fail "serve exit status $?"; fi
check "restore blk0" vfio-bind restore $BLK >/dev/null
echo "--- reconnect helper"; cat "$work/reconnect.log"
echo "--- reader windows"; cat "$work/gap.out"
echo "--- new serve"; grep -v "^$" "$work/serve2.log" | tail -n 8
rm -rf "$work"
dmesg -n 4   # the harness's console level again (quiet loglevel=4)
hil_summary crash
