#!/usr/bin/env bash
# HIL test of `serve blk --ublk` (guest kernel 6.12: Debian's 6.1 has no ublk_drv): the device as
# /dev/ublkbN with ext4 on it, files and their checksums, fio with crc32c verification through a
# kill -9 of the driver and a `--recover` by the next one (the kernel holds the I/O meanwhile and
# re-issues what was in flight: no error reaches fio or ext4), hot upgrades in both modes under fio
# (the successor recovers the disk), fsck clean, a clean stop removes the disk; the refusals (a ublk id in use, nothing to recover). Every command is bounded by
# `timeout`, so a hang fails a check instead of the run.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk blk-baseline
BLK=$(role blk) BLK1=$(role blk-baseline)
work=$(mktemp -d)
mnt=$work/mnt; mkdir -p "$mnt"
finish() { hil_summary ublk; exit; }
if [[ ! -e /dev/ublk-control ]]; then
  fail "no /dev/ublk-control on $(uname -r): run this on the 6.12 guest (tools/hil/run --kernel 6.12)"
  finish
fi

# start_server LOG ARGS...: serve blk --ublk in the background, $server its pid; waits until the
# disk serves (bounded); $dev is /dev/ublkbN, $startup_ms how long it took.
start_server() {
  local log=$1; shift
  local start=$(date +%s%N)
  virtio-vfio serve blk $BLK --ublk "$@" 2>"$log" &
  server=$!
  for _ in $(seq 600); do
    dev=$(grep -o '/dev/ublkb[0-9]* serving' "$log" 2>/dev/null | head -n1 | cut -d' ' -f1)
    if [[ -n $dev ]]; then startup_ms=$((($(date +%s%N) - start) / 1000000)); return 0; fi
    kill -0 $server 2>/dev/null || break; sleep 0.05
  done
  fail "serve blk --ublk did not start: $(cat "$log")"; return 1
}

check "bind blk0" vfio-bind bind $BLK >/dev/null
start_server "$work/serve1.log" || finish
echo "  serving $dev after $startup_ms ms"
bytes=$(sed -n 's/.*exporting \([0-9]*\) bytes.*/\1/p' "$work/serve1.log" | head -n1)
[[ -b $dev && $(blockdev --getsize64 "$dev") == "$bytes" ]] && pass "$dev is a block device of the virtio device's $bytes bytes" \
  || fail "$dev: $(ls -l "$dev" 2>&1), size $(blockdev --getsize64 "$dev" 2>&1), log: $(cat "$work/serve1.log")"
id=${dev#/dev/ublkb}
name=$(basename "$dev")
echo "  queue limits: logical $(cat /sys/block/$name/queue/logical_block_size), max $(cat /sys/block/$name/queue/max_sectors_kb) KiB, write cache '$(cat /sys/block/$name/queue/write_cache)', discard max $(cat /sys/block/$name/queue/discard_max_bytes)"
[[ $(cat /sys/block/$name/queue/write_cache) == "write back" ]] && pass "the kernel knows the device's volatile cache (flushes reach it)" \
  || fail "write_cache: $(cat /sys/block/$name/queue/write_cache)"

# Refusals: a second driver for the same function; another function asking for the same ublk id.
out=$(timeout 30 virtio-vfio serve blk $BLK --ublk 2>&1); rc=$?
[[ $rc != 0 && -b $dev ]] && pass "a second driver for $BLK is refused (exit $rc: $(head -n1 <<<"$out")), $dev untouched" || fail "second driver: exit $rc: $out"
if vfio-bind bind $BLK1 >/dev/null 2>&1; then
  out=$(timeout 60 virtio-vfio serve blk $BLK1 --ublk --ublk-id "$id" 2>&1); rc=$?
  [[ $rc == 75 && $out == *"ublk device $id exists"* ]] && pass "ublk id $id is refused to $BLK1 (exit 75)" || fail "id in use: exit $rc: $out"
  check "restore blk1" vfio-bind restore $BLK1 >/dev/null
else fail "bind $BLK1"; fi

check "mkfs.ext4 on $dev" timeout 120 mkfs.ext4 -q -F "$dev"
check "mount" timeout 30 mount "$dev" "$mnt"
mkdir -p "$mnt/tree/a/b"
for i in $(seq 1 30); do head -c $((RANDOM * 4 + i)) /dev/urandom >"$mnt/tree/a/file$i"; done
cp /opt/swift/usr/lib/swift/linux/libswiftCore.so "$mnt/tree/a/b/"
(cd "$mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/sums"
check "sync the file tree" timeout 60 sync
(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "checksums read back through ublk" || fail "checksums differ"

# fio: random 4 KiB writes and reads with crc32c in every block, then a verify pass.
timeout 600 fio --name=ublk --filename="$mnt/fio.dat" --size=24M --rw=randrw --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$work/fio.out" >/dev/null 2>&1 &
fio=$!
python3 Tests/HIL/gap-probe.py "$dev" "$work/gap.out" &
probe=$!
sleep 3
kill -0 $fio 2>/dev/null && pass "fio is running when the driver is killed" || fail "fio ended before the kill: $(tail -n 5 "$work/fio.out")"

kill -9 $server; wait $server 2>/dev/null
[[ -b $dev ]] && pass "$dev stays after kill -9 of its driver (the kernel holds its I/O)" || fail "$dev went away with its driver"
start_server "$work/serve2.log" --recover || finish
echo "  recovered $dev after $startup_ms ms"
grep -q "recovered, with the requests the kernel held" "$work/serve2.log" && pass "serve blk --ublk --recover took $dev over (END_USER_RECOVERY)" \
  || fail "serve2: $(cat "$work/serve2.log")"
sleep 2
kill -TERM $probe 2>/dev/null; wait $probe 2>/dev/null
gap=$(tail -n 1 "$work/gap.out")
gap_ms=$(awk '{printf "%d", $2}' <<<"$gap")
echo "ublk-crash-gap-ms $gap_ms"
[[ $gap == *"errors 0" && $gap_ms -gt 0 ]] && pass "the reader saw no error through the crash and recovery ($gap)" || fail "reader: $gap"
if timeout 600 tail --pid=$fio -f /dev/null; wait $fio; then rc=0; else rc=$?; fi
[[ $rc == 0 ]] && grep -q "err= 0" "$work/fio.out" && pass "fio completed its crc32c verify pass with no error" \
  || fail "fio exit $rc: $(grep -E 'err=|verify|error' "$work/fio.out" | head -n 5)"
grep -E "^ +(write|read):" "$work/fio.out" | sed 's/^ */  fio /'
(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "the file tree's checksums match after the crash" || fail "checksums differ after the crash"
# Hot upgrades under fio, live and reset mode: the successor recovers /dev/ublkbN once its
# predecessor is gone (the kernel holds the I/O meanwhile); a reader measures the gap.
timeout 900 fio --name=ublk-upgrade --filename="$mnt/fio2.dat" --size=16M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --time_based --runtime=600 --output="$work/fio2.out" >/dev/null 2>&1 &
fio=$!
python3 Tests/HIL/gap-probe.py "$dev" "$work/gaps" &
probe=$!
for _ in $(seq 100); do grep -q ready "$work/gaps" 2>/dev/null && break; sleep 0.1; done
sleep 2
for mode in live reset live reset; do
  kill -USR1 $probe; sleep 0.5; : >"$work/gaps"
  before=$(pgrep -f "virtio-vfio serve blk $BLK" | head -n1)
  out=$(timeout 120 virtio-vfio upgrade $BLK --binary "$(command -v virtio-vfio)" --mode $mode 2>&1); rc=$?
  sleep 1; kill -USR1 $probe; sleep 0.5
  read -r gap errors < <(sed -nE 's/^gap-ms ([0-9.]+) reads [0-9]+ errors ([0-9]+).*/\1 \2/p' "$work/gaps" | tail -n1)
  after=$(pgrep -f "virtio-vfio serve blk $BLK" | head -n1)
  echo "ublk-upgrade-$mode-gap-ms $gap"
  [[ $rc == 0 && -n $gap && $errors == 0 && -n $after && $after != "$before" && -b $dev ]] \
    && pass "$mode upgrade under fio: pid $before -> $after, $dev kept, a reader saw no error, longest gap $gap ms" \
    || fail "$mode upgrade: exit $rc ($out), pids $before -> $after, gaps: $(cat "$work/gaps")"
done
server=$(pgrep -f "virtio-vfio serve blk $BLK" | head -n1)
grep -c "recovered, with the requests the kernel held" "$work/serve2.log" | grep -qx 5 && pass "each successor recovered $dev (END_USER_RECOVERY)" \
  || fail "successor recoveries: $(grep -c recovered "$work/serve2.log"); $(tail -n 5 "$work/serve2.log")"
kill -TERM $probe 2>/dev/null; wait $probe 2>/dev/null
kill -0 $fio 2>/dev/null && pass "fio ran through the upgrades" || fail "fio ended early: $(tail -n 5 "$work/fio2.out")"
kill -INT $fio 2>/dev/null; wait $fio
if grep -qE "err= *0" "$work/fio2.out" && ! grep -qiE "verify.*(fail|bad)|crc32c.*(bad|wanted)" "$work/fio2.out"; then
  pass "fio through the upgrades: no I/O error, no verify failure ($(grep -oE 'write: IOPS=[^,]*' "$work/fio2.out" | head -n1))"
else
  fail "fio through the upgrades: $(grep -E 'err=|verify|crc' "$work/fio2.out" | head -n 5)"
fi
(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "the file tree's checksums match after the upgrades" || fail "checksums differ after the upgrades"

check "umount" timeout 60 umount "$mnt"
check "fsck.ext4 -f -n is clean" timeout 120 fsck.ext4 -f -n "$dev"
if dmesg | grep -E "$name" | grep -qE "I/O error|EXT4-fs (error|warning)|Buffer I/O"; then
  fail "dmesg has I/O or ext4 errors: $(dmesg | grep -E "$name" | tail -n 5)"
else pass "dmesg: no I/O error, no ext4 error on $name"; fi

# The serving driver is the last successor (not this shell's child): its log says how it ended.
kill -TERM $server 2>/dev/null
timeout 60 tail --pid=$server -f /dev/null && grep -q "stopped; ublk:" "$work/serve2.log" && ! grep -q "error:" "$work/serve2.log" \
  && pass "serve stops cleanly on SIGTERM: $(grep -o 'ublk: [0-9]* reads.*' "$work/serve2.log" | tail -n1)" || fail "stop: $(tail -n 5 "$work/serve2.log")"
grep -q "removed $dev" "$work/serve2.log" && [[ ! -e $dev ]] && pass "a clean stop removes $dev" || fail "after stop: $(ls "$dev" 2>&1); $(tail -n 3 "$work/serve2.log")"
out=$(timeout 30 virtio-vfio serve blk $BLK --ublk --recover 2>&1); rc=$?
[[ $rc == 75 && $out == *"nothing"* || $rc == 75 && $out == *"no ublk device"* ]] && pass "--recover with nothing left behind is refused (exit 75)" || fail "--recover: exit $rc: $out"
check "restore blk0" vfio-bind restore $BLK >/dev/null
echo "--- first serve"; tail -n 6 "$work/serve1.log"
echo "--- recovering serve"; tail -n 8 "$work/serve2.log"
rm -rf "$work"
finish
