#!/usr/bin/env bash
# HIL test of the virtio-blk driver core: GET_ID, write/read round trips in every completion mode,
# flush, range checks, and the kernel's virtio-blk reading our data after restore (and we theirs).
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
work=$(mktemp -d)
kdev=$(ls /sys/bus/pci/devices/$BLK/virtio*/block | head -n1)
serial=$(cat /sys/block/$kdev/serial 2>/dev/null)  # what the kernel's driver read with GET_ID

# The kernel writes a pattern first; our driver must read exactly it.
head -c $((4 << 20)) /dev/urandom >"$work/kernel"
check "kernel writes 4 MiB at sector 8192" dd if="$work/kernel" of=/dev/$kdev bs=1M seek=4 oflag=direct conv=fsync status=none
check "bind blk0" vfio-bind bind $BLK >/dev/null
# A kernel without ublk (Debian's 6.1): --ublk is refused in one line before the device is touched.
if [[ ! -e /dev/ublk-control ]]; then
  out=$(timeout 30 virtio-vfio serve blk $BLK --ublk 2>&1); rc=$?
  [[ $rc == 69 && $(wc -l <<<"$out") == 1 && $out == *"ublk is not available"*"--nbd"* ]] \
    && pass "serve blk --ublk on $(uname -r) is refused (exit 69): ${out:0:90}..." || fail "--ublk without ublk: exit $rc: $out"
fi
virtio-vfio blk read $BLK --sector 8192 --count 8192 >"$work/ours" && cmp -s "$work/kernel" "$work/ours" \
  && pass "our driver reads what the kernel wrote (4 MiB)" || fail "read of the kernel's data differs"

id=$(virtio-vfio blk id $BLK)
echo "$id"
contains "GET_ID returns the drive serial the kernel saw ('$serial')" "$id" "serial: $serial"
contains "capacity from config space" "$id" "capacity: 524288 sectors"

head -c $((3 << 20)) /dev/urandom >"$work/pattern"
for mode in poll msix hybrid; do
  virtio-vfio blk write $BLK --sector 32768 --flush --irq $mode <"$work/pattern" 2>/dev/null \
    && virtio-vfio blk read $BLK --sector 32768 --count 6144 --irq $mode >"$work/back" && cmp -s "$work/pattern" "$work/back" \
    && pass "3 MiB write + flush + read back, $mode mode" || fail "round trip in $mode mode"
done
# An odd-sized request that is not a multiple of the 128 KiB transfer size.
head -c $((512 * 777)) /dev/urandom >"$work/odd"
virtio-vfio blk write $BLK --sector 99 <"$work/odd" 2>/dev/null && virtio-vfio blk read $BLK --sector 99 --count 777 >"$work/oddback" \
  && cmp -s "$work/odd" "$work/oddback" && pass "777-sector request at an unaligned sector" || fail "odd-sized round trip"
check "flush" virtio-vfio blk flush $BLK
out=$(virtio-vfio bench blk $BLK --queues 2 --qd 8 --bs 4096 --irq msix --seconds 1 --json 2>/dev/null)
[[ $(jq -r '.[0].queues' <<<"$out") == 2 && $(jq -r '.[0].errors' <<<"$out") == 0 && $(jq -r '.[0].requests > 100' <<<"$out") == true ]] \
  && pass "bench blk on 2 queues (MQ), one worker thread each, no errors" || fail "MQ bench: $out"

expect_exit 64 "a read past the capacity is refused" virtio-vfio blk read $BLK --sector 524287 --count 2
contains "the refusal names the capacity" "$LAST_ERR" "past the capacity of 524288 sectors"
expect_exit 64 "a write that is not whole sectors is refused" sh -c "head -c 100 /dev/zero | virtio-vfio blk write $BLK"
RNG=$(role rng)
if [[ -n $RNG ]]; then
  vfio-bind bind $RNG >/dev/null
  expect_exit 64 "blk on the rng is refused" virtio-vfio blk id $RNG
  contains "the refusal names the device type" "$LAST_ERR" "not virtio-blk"
  vfio-bind restore $RNG >/dev/null
else
  skip "blk on another device type: the device map $HIL_MAP has no rng role"
fi

check "restore blk0" vfio-bind restore $BLK >/dev/null
sleep 0.3
kdev=$(ls /sys/bus/pci/devices/$BLK/virtio*/block | head -n1)
dd if=/dev/$kdev bs=1M skip=16 count=3 iflag=direct status=none | cmp -s - "$work/pattern" \
  && pass "the kernel's virtio-blk reads what our driver wrote" || fail "kernel read after restore differs"
rm -rf "$work"
hil_summary blk
