#!/usr/bin/env bash
# HIL test of the foundation (issue 3): list, bind, info, reset cycles, restore, kernel driver works again.
# Runs inside the guest: tools/hil/run Tests/HIL/foundation.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh

need_roles rng blk blk-baseline net net-peer
RNG=$(role rng) BLK=$(role blk) BLK1=$(role blk-baseline) NET0=$(role net) NET1=$(role net-peer)

# --- list: every guest virtio function with its type, before anything is bound
list=$(virtio-vfio list --json)
check "list --json is valid JSON" jq -e 'length > 0' <<<"$list" >/dev/null
for pair in "$RNG rng" "$BLK blk" "$BLK1 blk" "$NET0 net" "$NET1 net"; do
  set -- $pair
  got=$(jq -r --arg a "$1" '.[] | select(.address == $a) | "\(.virtioType) \(.driver) \(.iommuGroup)"' <<<"$list")
  [[ $got == "$2 virtio-pci "[0-9]* ]] && pass "list: $1 is virtio-$2 on virtio-pci with an IOMMU group ($got)" \
    || fail "list: $1: got '$got'"
done

# --- refusals before binding: clear message, documented exit code, nothing touched
expect_exit 69 "info on a device bound to virtio-pci is refused" virtio-vfio info $BLK
contains "the refusal names the fix" "$LAST_ERR" "tools/vfio-bind bind $BLK"
expect_exit 69 "info on a non-virtio function is refused" virtio-vfio info 0000:00:1f.0
contains "the refusal says it is not virtio" "$LAST_ERR" "is not a virtio device"
expect_exit 64 "a malformed BDF is a usage error" virtio-vfio info 00:05
expect_exit 66 "a missing function is reported" virtio-vfio reset 0000:00:0a.0
[[ $(driver_of $BLK) == virtio-pci ]] && pass "refusals left $BLK on virtio-pci" || fail "$BLK moved to $(driver_of $BLK)"

# --- bind the rng and one blk device
blkdev=$(ls /sys/bus/pci/devices/$BLK/virtio*/block 2>/dev/null | head -n1)
check "blk0 has a kernel block device before binding ($blkdev)" test -n "$blkdev"
check "bind rng and blk0 to vfio-pci" vfio-bind bind $RNG $BLK
for d in $RNG $BLK; do
  [[ $(driver_of $d) == vfio-pci ]] && pass "$d is on vfio-pci" || fail "$d is on $(driver_of $d)"
done

for d in $RNG $BLK; do
  info=$(virtio-vfio info $d --json) || fail "info $d --json exited $?"
  type=$(jq -r .virtioType <<<"$info")
  caps=$(jq -r '[.capabilities[].type] | join(",")' <<<"$info")
  feats=$(jq -r '.deviceFeatureNames | join(" ")' <<<"$info")
  queues=$(jq -r '.queueCount' <<<"$info")
  contains "info $d: common, notify, isr capabilities ($caps)" "$caps" "common"
  contains "info $d: notify capability" "$caps" "notify"
  contains "info $d: isr capability" "$caps" "isr"
  contains "info $d: offers VERSION_1" "$feats" "VERSION_1"
  contains "info $d: offers ACCESS_PLATFORM (iommu_platform=on)" "$feats" "ACCESS_PLATFORM"
  [[ $queues -ge 1 ]] && pass "info $d: $queues queue(s), first max size $(jq -r '.queues[0].maxSize' <<<"$info")" \
    || fail "info $d: no queues"
  [[ $(jq -r '[.regions[] | select(.name == "BAR4")] | length' <<<"$info") == 1 ]] && pass "info $d: BAR4 region listed" \
    || fail "info $d: no BAR4 region"
  echo "--- virtio-vfio info $d"
  virtio-vfio info $d
done
[[ $(jq -r .virtioType <<<"$(virtio-vfio info $RNG --json)") == rng ]] && pass "rng reports type rng" || fail "rng type"
[[ $(jq -r .virtioType <<<"$(virtio-vfio info $BLK --json)") == blk ]] && pass "blk reports type blk" || fail "blk type"

# --- reset cycles: the seed's reset, then renegotiation, 100 times on each device
for d in $RNG $BLK; do
  out=$(virtio-vfio reset $d --cycles 100 --quiet) ; rc=$?
  echo "$out"
  [[ $rc == 0 ]] && pass "reset $d --cycles 100 exits 0" || fail "reset $d --cycles 100 exited $rc"
  contains "reset $d: 100 cycles ok" "$out" "100 cycles ok"
  contains "reset $d: device left reset" "$out" "status after: 0 (reset)"
done
out=$(virtio-vfio reset $RNG --cycles 2 --feature RING_EVENT_IDX --feature RING_INDIRECT_DESC)
echo "$out"
contains "reset with --feature accepts RING_EVENT_IDX when offered" "$out" "RING_EVENT_IDX"
contains "reset prints each status transition" "$out" "ACKNOWLEDGE|DRIVER -> ACKNOWLEDGE|DRIVER"
contains "reset accepts VERSION_1 and ACCESS_PLATFORM" "$out" "VERSION_1 ACCESS_PLATFORM"
expect_exit 64 "an unknown feature name is a usage error" virtio-vfio reset $RNG --feature NO_SUCH_FEATURE
expect_exit 64 "--cycles 0 is refused" virtio-vfio reset $RNG --cycles 0

# --- restore: the kernel drivers take the devices back and work
check "restore rng and blk0" vfio-bind restore $RNG $BLK
for d in $RNG $BLK; do
  [[ $(driver_of $d) == virtio-pci ]] && pass "$d is back on virtio-pci" || fail "$d is on $(driver_of $d)"
done
sleep 0.5
blkdev=$(ls /sys/bus/pci/devices/$BLK/virtio*/block 2>/dev/null | head -n1)
check "blk0 block device reappeared ($blkdev)" test -n "$blkdev"
[[ -n $blkdev ]] && check "kernel virtio-blk reads /dev/$blkdev after restore" dd if=/dev/$blkdev of=/dev/null bs=64k count=16 status=none
check "kernel virtio-rng is registered again" grep -q virtio_rng /sys/class/misc/hw_random/rng_available
check "kernel virtio-rng produces bytes after restore" sh -c '[ "$(head -c 16 /dev/hwrng | wc -c)" = 16 ]'

hil_summary foundation
