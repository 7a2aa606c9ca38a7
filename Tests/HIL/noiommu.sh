#!/usr/bin/env bash
# HIL without an IOMMU (tools/hil/run --noiommu): VFIO in unsafe no-IOMMU mode, devices without
# ACCESS_PLATFORM using guest-physical addresses, DMA memory in hugepages. The mode is visible
# (info, a warning on every open), a device that offers ACCESS_PLATFORM is refused by name, and
# the rng works (rngtest). The blk/NBD, net and upgrade suites run after this one in the same guest.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng
RNG=$(role rng)
PLATFORM=0000:00:09.0  # an rng with iommu_platform=on (tools/hil/run --noiommu)
work=$(mktemp -d -p /run)

[[ $(cat /sys/module/vfio/parameters/enable_unsafe_noiommu_mode 2>/dev/null) == Y ]] \
  && pass "vfio is in unsafe no-IOMMU mode" || { fail "vfio is not in no-IOMMU mode (run under tools/hil/run --noiommu)"; hil_summary noiommu; exit 1; }
check "bind the rng" vfio-bind bind "$RNG" >/dev/null
group=$(basename "$(readlink "/sys/bus/pci/devices/$RNG/iommu_group")")
[[ -e /dev/vfio/noiommu-$group && ! -e /dev/vfio/$group ]] && pass "its group is /dev/vfio/noiommu-$group" || fail "no noiommu group node: $(ls /dev/vfio)"
info=$(virtio-vfio info "$RNG" 2>&1)
contains "info says the device is driven without an IOMMU" "$info" "NO IOMMU (VFIO no-IOMMU mode)"
virtio-vfio rng "$RNG" --bytes 2500000 2>"$work/err" | rngtest >"$work/rngtest" 2>&1
ok=$(sed -nE 's/.*FIPS 140-2 successes: ([0-9]+).*/\1/p' "$work/rngtest")
((${ok:-0} >= 990)) && pass "2.5 MB from hugepage DMA memory by physical address: rngtest $ok/999 FIPS blocks" \
  || fail "rngtest: $(cat "$work/rngtest" "$work/err")"
contains "every open that maps DMA memory warns" "$(cat "$work/err")" "driven without an IOMMU (VFIO no-IOMMU mode)"
free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)
total=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)
[[ $free == "$total" ]] && pass "every hugepage is free again after the driver exits ($free)" || fail "hugepages: $free of $total free"
check "restore the rng" vfio-bind restore "$RNG" >/dev/null

check "bind the ACCESS_PLATFORM rng" vfio-bind bind "$PLATFORM" >/dev/null
expect_exit 69 "a device offering ACCESS_PLATFORM is refused" virtio-vfio rng "$PLATFORM" --bytes 4096
contains "the refusal names ACCESS_PLATFORM and the way out" "$LAST_ERR" "offers ACCESS_PLATFORM (§6.1)"
check "restore the ACCESS_PLATFORM rng" vfio-bind restore "$PLATFORM" >/dev/null

# Too few hugepages: refused by name, with the count and the fix.
echo 0 >/proc/sys/vm/nr_hugepages
check "bind the rng again" vfio-bind bind "$RNG" >/dev/null
expect_exit 69 "with no hugepages reserved, the driver refuses" virtio-vfio rng "$RNG" --bytes 4096
contains "the refusal says how to reserve them" "$LAST_ERR" "/proc/sys/vm/nr_hugepages"
echo "$total" >/proc/sys/vm/nr_hugepages

# Root without the capabilities the mode needs: the kernel opens a no-IOMMU group only with
# CAP_SYS_RAWIO, and shows physical addresses in /proc/self/pagemap only with CAP_SYS_ADMIN.
expect_exit 69 "without CAP_SYS_RAWIO, the driver refuses" setpriv --bounding-set=-sys_rawio virtio-vfio rng "$RNG" --bytes 4096
contains "the refusal names the group and CAP_SYS_RAWIO" "$LAST_ERR" "/dev/vfio/noiommu-$group: a VFIO no-IOMMU group opens only with CAP_SYS_RAWIO"
expect_exit 69 "without CAP_SYS_ADMIN (no physical addresses in pagemap), the driver refuses" setpriv --bounding-set=-sys_admin virtio-vfio rng "$RNG" --bytes 4096
contains "the refusal names pagemap and CAP_SYS_ADMIN" "$LAST_ERR" "/proc/self/pagemap shows no physical addresses to this process"
free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)
[[ $free == "$total" ]] && pass "the refused runs left every hugepage free ($free)" || fail "hugepages: $free of $total free"
virtio-vfio rng "$RNG" --bytes 65536 2>"$work/err" | wc -c >"$work/count"
[[ $(cat "$work/count") == 65536 ]] && pass "the device works after the refusals (64 KiB)" || fail "after the refusals: $(cat "$work/count" "$work/err")"
check "restore the rng" vfio-bind restore "$RNG" >/dev/null
rm -rf "$work"
hil_summary noiommu
