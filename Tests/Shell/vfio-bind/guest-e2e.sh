#!/usr/bin/env bash
#
# End-to-end test of tools/vfio-bind against the real kernel, for the HIL QEMU guest only
# (device layout: tools/hil/run). It binds and unbinds REAL devices, so it
# refuses to run unless VFIO_BIND_E2E=1 is set and every device it touches is the virtio
# device HIL.md puts at that address, with an IOMMU group.
#
#   VFIO_BIND_E2E=1 VFIO_BIND_STATE_DIR=/run/vfio-bind VFIO_BIND_RULES_DIR=/run/vfio-bind/rules \
#       Tests/Shell/vfio-bind/guest-e2e.sh
#
# Addresses can be changed with E2E_RNG, E2E_BLK, E2E_NET, E2E_9P (defaults 0000:00:04.0,
# 0000:00:05.0, 0000:00:07.0, 0000:00:02.0: the tools/hil/run layout). Prints "N passed, N failed"; exit 1 on failure.
# Assertions are handed to `expect` as single-quoted strings that eval expands later.
# shellcheck disable=SC2016,SC2034

set -uo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
VB=$(cd -- "$HERE/../../.." && pwd)/tools/vfio-bind
RNG=${E2E_RNG:-0000:00:04.0} BLK=${E2E_BLK:-0000:00:05.0} NET=${E2E_NET:-0000:00:07.0} P9=${E2E_9P:-0000:00:02.0}
PCI=/sys/bus/pci/devices
STATE_DIR=${VFIO_BIND_STATE_DIR:-/var/lib/vfio-bind}
RULES_DIR=${VFIO_BIND_RULES_DIR:-/etc/udev/rules.d}

if [[ ${VFIO_BIND_E2E:-} != 1 ]]; then
	echo "guest-e2e: refusing to run: it binds real devices to vfio-pci; set VFIO_BIND_E2E=1, inside the HIL guest only" >&2
	exit 2
fi
for spec in "$RNG 0x1044" "$BLK 0x1042" "$NET 0x1041" "$P9 0x1049"; do
	read -r bdf id <<<"$spec"
	if [[ $(cat "$PCI/$bdf/vendor" 2>/dev/null) != 0x1af4 || $(cat "$PCI/$bdf/device" 2>/dev/null) != "$id" || ! -e $PCI/$bdf/iommu_group ]]; then
		echo "guest-e2e: refusing to run: $bdf is not the virtio device 1af4:${id#0x} with an IOMMU group the HIL guest has there" >&2
		exit 2
	fi
done
[[ -d /sys/bus/pci/drivers/vfio-pci ]] || {
	echo "guest-e2e: vfio-pci is not loaded (the guest init loads it)" >&2
	exit 2
}

PASSED=0 FAILED=0 OUT='' ERR='' RC=0 CASE=''
vb() {
	OUT=$("$VB" "$@" 2>/tmp/vfio-bind-e2e.err)
	RC=$?
	ERR=$(</tmp/vfio-bind-e2e.err)
	printf '$ vfio-bind %s  -> exit %s\n' "$*" "$RC"
	[[ -n $OUT ]] && printf '  %s\n' "${OUT//$'\n'/$'\n'  }"
	[[ -n $ERR ]] && printf '  %s\n' "${ERR//$'\n'/$'\n'  }"
	return 0
}
expect() {
	local what=$1
	shift
	if "$@"; then
		PASSED=$((PASSED + 1))
		echo "ok   $CASE: $what"
	else
		FAILED=$((FAILED + 1))
		echo "FAIL $CASE: $what"
	fi
	return 0
}
rc() { [[ $RC == "$1" ]]; }
out_has() { grep -qF -- "$1" <<<"$OUT"; }
err_has() { grep -qF -- "$1" <<<"$ERR"; }
driver() { local l; l=$(readlink "$PCI/$1/driver" 2>/dev/null) && echo "${l##*/}"; }
group() { local l; l=$(readlink "$PCI/$1/iommu_group") && echo "${l##*/}"; }
override() { cat "$PCI/$1/driver_override"; }
netif() { local i; for i in "$PCI/$1"/virtio*/net/*; do echo "${i##*/}"; return; done; }
cleanup() { "$VB" restore --force "$RNG" "$BLK" "$NET" >/dev/null 2>&1 || true; }
trap cleanup EXIT

CASE=status
vb status
expect "exit 0" rc 0
expect "lists the rng with its group" out_has "$RNG 'Virtio 1.0 RNG' 1af4:1044 iommu_group=$(group "$RNG") drv=virtio-pci virtio=rng"
expect "marks the mounted 9p root share active" eval 'grep -F "$P9 " <<<"$OUT" | grep -qF "*Active*"'

CASE=9p-root-refused
vb bind "$P9"
expect "exit 3, names the share" eval 'rc 3 && err_has "9p share"'
expect "still on virtio-pci" eval '[[ $(driver "$P9") == virtio-pci ]]'

CASE=bind-rng
g=$(group "$RNG")
vb bind "${RNG#0000:}"
expect "exit 0" rc 0
expect "driver is vfio-pci" eval '[[ $(driver "$RNG") == vfio-pci ]]'
expect "driver_override is vfio-pci" eval '[[ $(override "$RNG") == vfio-pci ]]'
expect "/dev/vfio/$g is a character device" eval '[[ -c /dev/vfio/$g ]]'
expect "says so" out_has "$RNG: bound to vfio-pci (IOMMU group $g, /dev/vfio/$g)"
expect "state remembers virtio-pci" eval 'grep -qx driver=virtio-pci "$STATE_DIR/$RNG"'
vb bind "$RNG"
expect "second bind: already bound, exit 0" eval 'rc 0 && out_has "already bound to vfio-pci"'

CASE=group-open
sleep 60 9<>"/dev/vfio/$g" &
holder=$!
sleep 0.2
vb unbind "$RNG"
expect "unbind refused while a process holds /dev/vfio/$g" eval 'rc 3 && err_has "is open by process $holder (sleep)"'
expect "still vfio-pci" eval '[[ $(driver "$RNG") == vfio-pci ]]'
kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null

CASE=unbind-rng
vb unbind "$RNG"
expect "exit 0" rc 0
expect "no driver" eval '[[ -z $(driver "$RNG") ]]'
expect "driver_override cleared" eval '[[ $(override "$RNG") == "(null)" ]]'
expect "/dev/vfio/$g gone" eval '[[ ! -e /dev/vfio/$g ]]'
expect "state kept" eval '[[ -f $STATE_DIR/$RNG ]]'

CASE=restore-rng
vb restore "$RNG"
expect "exit 0" rc 0
expect "virtio-pci again" eval '[[ $(driver "$RNG") == virtio-pci ]]'
expect "state forgotten" eval '[[ ! -e $STATE_DIR/$RNG ]]'

CASE=blk
vb bind --persist "$BLK"
rule=$RULES_DIR/89-vfio-bind-$BLK.rules
expect "bind --persist: exit 0" rc 0
expect "vfio-pci" eval '[[ $(driver "$BLK") == vfio-pci ]]'
expect "rule written" eval 'grep -qF "KERNEL==\"$BLK\"" "$rule"'
vb restore "$BLK"
expect "restore: exit 0, virtio-pci" eval 'rc 0 && [[ $(driver "$BLK") == virtio-pci ]]'
expect "restore removed the rule" eval '[[ ! -e $rule ]]'
disk=''
for d in "$PCI/$BLK"/virtio*/block/*; do disk=${d##*/}; done
expect "block device is back" eval '[[ -n $disk && -b /dev/$disk ]]'
if [[ -n $disk ]] && command -v mkfs.ext4 >/dev/null && mkdir -p /tmp/e2e-mnt &&
	mkfs.ext4 -q -F "/dev/$disk" 2>/dev/null && mount "/dev/$disk" /tmp/e2e-mnt 2>/dev/null; then
	vb bind "$BLK"
	expect "mounted disk: exit 3 naming the mount point" eval 'rc 3 && err_has "/dev/$disk is mounted on /tmp/e2e-mnt"'
	expect "mounted disk: still virtio-pci" eval '[[ $(driver "$BLK") == virtio-pci ]]'
	umount /tmp/e2e-mnt
else
	echo "skip $CASE: mounted-disk refusal (no mkfs.ext4 or no ext4 in this guest)"
fi

CASE=net
ifn=$(netif "$NET")
if [[ -n $ifn ]] && command -v ip >/dev/null; then
	ip link set dev "$ifn" up
	vb bind "$NET"
	expect "interface up: exit 3" eval 'rc 3 && err_has "interface $ifn is up"'
	expect "interface up: still virtio-pci" eval '[[ $(driver "$NET") == virtio-pci ]]'
	ip link set dev "$ifn" down
	vb bind "$NET"
	expect "interface down: bound" eval 'rc 0 && [[ $(driver "$NET") == vfio-pci ]]'
	vb restore "$NET"
	expect "restore: virtio-pci and an interface again" eval 'rc 0 && [[ $(driver "$NET") == virtio-pci && -n $(netif "$NET") ]]'
else
	echo "skip $CASE: no interface on $NET or no ip command"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
