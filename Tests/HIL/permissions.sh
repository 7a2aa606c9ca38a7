#!/usr/bin/env bash
# HIL test of missing permissions (issue 7): a user without access to /dev/vfio/N gets one line
# naming the node and the fix (udev rule, vfio group), exit 77, and nothing changes on the device.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
vfio-bind bind $BLK >/dev/null && pass "bound blk" || fail "bind"
group=$(basename "$(readlink /sys/bus/pci/devices/$BLK/iommu_group)")
ls -l "/dev/vfio/$group" | grep -q '^crw-------' && pass "/dev/vfio/$group is root's only (0600)" || fail "mode: $(ls -l /dev/vfio/$group)"
for cmd in "info $BLK" "reset $BLK" "blk id $BLK" "serve blk $BLK --nbd unix:/tmp/perm.sock"; do
  expect_exit 77 "as uid 65534: virtio-vfio $cmd" timeout 20 "${nobody[@]}" virtio-vfio $cmd
  contains "  names /dev/vfio/$group and the fix" "$LAST_ERR" "/dev/vfio/$group"
  contains "  points to the udev rule" "$LAST_ERR" "udev"
  [[ $(wc -l <<<"$LAST_ERR") -le 2 ]] && pass "  one line of error" || fail "  error is $(wc -l <<<"$LAST_ERR") lines: $LAST_ERR"
done
[[ ! -e /tmp/perm.sock ]] && pass "no NBD socket was left behind" || fail "/tmp/perm.sock exists"
# The device is untouched: root still opens and drives it.
check "root reads the serial afterwards" timeout 20 virtio-vfio blk id $BLK
vfio-bind restore $BLK >/dev/null
hil_summary permissions
