#!/usr/bin/env bash
# Assertions are handed to `expect` as single-quoted strings that eval expands later.
# shellcheck disable=SC2016
#
# Tests for tools/vfio-bind. Each case builds a fake machine (sysfs, proc, dev, state and
# rules directories) in a temporary directory and runs vfio-bind against it with
# VFIO_BIND_FAKE_KERNEL=fake-kernel, which plays the kernel's reaction to sysfs writes
# and logs every write. The only command run against the real /sys is the read-only
# `vfio-bind status`.
#
# Usage: Tests/Shell/vfio-bind/run.sh        prints "N passed, N failed"; exit 1 on failure

set -uo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
VB=$REPO/tools/vfio-bind
FAKE_KERNEL=$HERE/fake-kernel
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfio-bind-test.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

PASSED=0 FAILED=0 NTREE=0
EXPECTED=()
T='' S='' P='' D='' OUT='' ERR='' RC=0 BEFORE='' CASE=''

# ------------------------------------------------------------------ fake machine
add_driver() { mkdir -p "$S/bus/pci/drivers/$1" && : >"$S/bus/pci/drivers/$1/bind" && : >"$S/bus/pci/drivers/$1/unbind"; }

# add_pci BDF VENDOR DEVICE CLASS GROUP DRIVER [NATIVE]: GROUP or DRIVER may be ''
add_pci() {
	local bdf=$1 ven=$2 dev=$3 cls=$4 grp=$5 drv=$6 native=${7:-$6} d
	d=$S/devices/pci0000:00/$bdf
	mkdir -p "$d"
	echo "0x$ven" >"$d/vendor"
	echo "0x$dev" >"$d/device"
	echo "0x$cls" >"$d/class"
	echo '(null)' >"$d/driver_override"
	echo "$native" >"$d/.native-driver"
	# 64 bytes of config space so lspci can name the device from pci.ids
	printf '%b' "\\x${ven:2:2}\\x${ven:0:2}\\x${dev:2:2}\\x${dev:0:2}\\x00\\x00\\x00\\x00\\x01\\x${cls:4:2}\\x${cls:2:2}\\x${cls:0:2}" >"$d/config"
	head -c 52 /dev/zero >>"$d/config"
	ln -s "$d" "$S/bus/pci/devices/$bdf"
	[[ -n $drv ]] && ln -s "$S/bus/pci/drivers/$drv" "$d/driver"
	if [[ -n $grp ]]; then
		mkdir -p "$S/kernel/iommu_groups/$grp/devices"
		ln -s "$d" "$S/kernel/iommu_groups/$grp/devices/$bdf"
		ln -s "$S/kernel/iommu_groups/$grp" "$d/iommu_group"
	fi
	if [[ $drv == vfio-pci ]]; then
		echo vfio-pci >"$d/driver_override"
		mkdir -p "$D/vfio" && : >"$D/vfio/$grp"
	fi
	return 0
}

# add_block BDF PATH-UNDER-DEVICE NAME MAJ:MIN [partition]
add_block() {
	local d=$S/devices/pci0000:00/$1/$2
	mkdir -p "$d/holders"
	echo "$4" >"$d/dev"
	[[ ${5:-} == partition ]] && echo 1 >"$d/partition"
	ln -s "$d" "$S/class/block/$3"
}

# add_netif BDF PATH-UNDER-DEVICE NAME FLAGS OPERSTATE
add_netif() {
	local d=$S/devices/pci0000:00/$1/$2
	mkdir -p "$d"
	echo "$4" >"$d/flags"
	echo "$5" >"$d/operstate"
	ln -s "$d" "$S/class/net/$3"
}

# A q35 guest like the HIL one: 9p root share, rng, blk (vda, vda1), two nets (one on
# vfio-pci already), an LPC/SATA pair sharing group 7, an rng without IOMMU group,
# a PCIe root port.
new_tree() {
	NTREE=$((NTREE + 1))
	T=$WORK/t$NTREE S=$WORK/t$NTREE/sys P=$WORK/t$NTREE/proc D=$WORK/t$NTREE/dev
	mkdir -p "$S/bus/pci/devices" "$S/kernel/iommu_groups" "$S/class/block" "$S/class/net" \
		"$S/devices/pci0000:00" "$P/self" "$P/net" "$D"
	: >"$S/bus/pci/drivers_probe"
	local drv
	for drv in virtio-pci vfio-pci ahci lpc_ich pcieport; do add_driver "$drv"; done
	add_pci 0000:00:02.0 1af4 1049 000200 1 virtio-pci
	mkdir -p "$S/devices/pci0000:00/0000:00:02.0/virtio0" && echo hostroot >"$S/devices/pci0000:00/0000:00:02.0/virtio0/mount_tag"
	add_pci 0000:00:04.0 1af4 1044 00ff00 3 virtio-pci
	add_pci 0000:00:05.0 1af4 1042 010000 4 virtio-pci
	add_block 0000:00:05.0 virtio2/block/vda vda 254:0
	add_block 0000:00:05.0 virtio2/block/vda/vda1 vda1 254:1 partition
	add_pci 0000:00:06.0 1af4 1041 020000 5 virtio-pci
	add_netif 0000:00:06.0 virtio3/net/eth0 eth0 0x1002 down
	add_pci 0000:00:07.0 1af4 1041 020000 6 vfio-pci virtio-pci
	add_pci 0000:00:08.0 1af4 1044 00ff00 '' virtio-pci
	add_pci 0000:00:1c.0 8086 7690 060400 8 pcieport
	add_pci 0000:00:1f.0 8086 2918 060100 7 lpc_ich
	add_pci 0000:00:1f.2 8086 2922 010601 7 ahci
	cat >"$P/self/mountinfo" <<-'EOF'
		20 1 0:30 / / ro,relatime - 9p hostroot ro,trans=virtio
		21 20 0:5 / /proc rw,relatime - proc proc rw
		22 20 0:6 / /sys rw,relatime - sysfs sysfs rw
		23 20 0:7 / /dev rw,relatime - devtmpfs devtmpfs rw
		24 20 0:31 / /run rw,relatime - tmpfs tmpfs rw
	EOF
	echo 'Filename				Type		Size		Used		Priority' >"$P/swaps"
	printf 'Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n' >"$P/net/route"
	: >"$P/net/ipv6_route"
}

# ------------------------------------------------------------------ running and checking
snap() { # listing, link targets and contents of the whole fake tree
	(
		cd "$T" && find . -printf '%p %y %l\n' | LC_ALL=C sort
		find . -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum
	) | md5sum
}

vb() { # ARGS...: run vfio-bind against the fake tree -> OUT, ERR, RC (BEFORE = snapshot)
	BEFORE=$(snap)
	OUT=$(env VFIO_BIND_SYSFS="$S" VFIO_BIND_PROC="$P" VFIO_BIND_DEV="$D" \
		VFIO_BIND_STATE_DIR="$T/state" VFIO_BIND_RULES_DIR="$T/rules" \
		VFIO_BIND_FAKE_KERNEL="$FAKE_KERNEL" FAKE_KERNEL_LOG="$T/writes.log" \
		VFIO_BIND_TIMEOUT=0 "$VB" "$@" 2>"$WORK/stderr")
	RC=$?
	ERR=$(<"$WORK/stderr")
}

expect() { # DESCRIPTION COMMAND...
	local what=$1
	shift
	if "$@"; then
		PASSED=$((PASSED + 1))
		echo "ok   $CASE: $what"
	else
		FAILED=$((FAILED + 1))
		echo "FAIL $CASE: $what"
		echo "     exit $RC"
		printf '     stdout| %s\n' "${OUT//$'\n'/$'\n'     stdout| }"
		printf '     stderr| %s\n' "${ERR//$'\n'/$'\n'     stderr| }"
		[[ -f $T/writes.log ]] && sed 's/^/     writes| /' "$T/writes.log"
	fi
	return 0
}

rc() { [[ $RC == "$1" ]]; }
out_has() { grep -qF -- "$1" <<<"$OUT"; }
err_has() { grep -qF -- "$1" <<<"$ERR"; }
unchanged() { [[ $(snap) == "$BEFORE" ]]; } # the snapshot includes the fake kernel's write log
driver_is() { [[ $(readlink "$S/bus/pci/devices/$1/driver" 2>/dev/null) == */"$2" ]]; }
no_driver() { [[ ! -e $S/bus/pci/devices/$1/driver ]]; }
override_is() { [[ $(<"$S/bus/pci/devices/$1/driver_override") == "$2" ]]; }
file_has() { [[ -f $1 ]] && grep -qF -- "$2" "$1"; }
absent() { [[ ! -e $1 ]]; }
writes_are() { [[ $(<"$T/writes.log") == "$1" ]]; }
section_of() { # BDF -> the status heading the device is listed under
	awk -v b="$1" '/^[A-Z].* devices / { h = $0 } index($0, b " ") == 1 { print h }' <<<"$OUT"
}
section_is() { [[ $(section_of "$1") == "$2" ]]; }

refusal() { # EXIT-CODE MESSAGE: the common assertions of a refused command
	expect "exit $1" rc "$1"
	expect "says '$2'" err_has "$2"
	expect "writes nothing" unchanged
}

# ------------------------------------------------------------------ cases
CASE=usage
new_tree
vb
expect "no command: exit 1" rc 1
vb --help
expect "--help: exit 0 with usage" eval 'rc 0 && out_has "Usage: vfio-bind status"'
vb frobnicate
expect "unknown command: exit 1" eval 'rc 1 && err_has "unknown command"'
vb bind --bogus 00:04.0
expect "unknown option: exit 1" rc 1
vb bind
expect "bind without devices: exit 1" rc 1
vb restore --persist 00:04.0
expect "restore --persist: exit 1" rc 1

CASE=bad-bdf
vb bind 00:5.0
refusal 2 "vfio-bind: error: bad PCI address '00:5.0'"
vb bind 0000:00:04.0 zz:00.0
refusal 2 "bad PCI address 'zz:00.0'"

CASE=no-such-device
vb bind 00:09.0
refusal 2 "no PCI device 0000:00:09.0"

CASE=bridge
vb bind 00:1c.0
refusal 2 "0000:00:1c.0 is a PCI bridge"

CASE=no-vfio-pci
new_tree
rm -r "$S/bus/pci/drivers/vfio-pci"
vb bind 00:04.0
refusal 4 "vfio-pci driver not available: load it with 'modprobe vfio-pci' (kernel needs CONFIG_VFIO_PCI)"

CASE=no-iommu-group
new_tree
vb bind 00:08.0
refusal 4 "0000:00:08.0 has no IOMMU group"
expect "names the fixes" eval 'err_has intel_iommu=on && err_has enable_unsafe_noiommu_mode'

CASE=group-member
vb bind 00:1f.2
refusal 3 "IOMMU group 7 also holds 0000:00:1f.0, bound to lpc_ich"
expect "says nothing changed" err_has "nothing was changed"

CASE=mounted-partition
new_tree
echo '40 20 254:1 / /mnt/data rw,relatime - ext4 /dev/vda1 rw' >>"$P/self/mountinfo"
vb bind 00:05.0
refusal 3 "refusing 0000:00:05.0: /dev/vda1 is mounted on /mnt/data"

CASE=mounted-as-dev-root
new_tree
echo '41 20 254:0 / /srv rw,relatime - ext4 /dev/root rw' >>"$P/self/mountinfo"
vb bind 00:05.0
refusal 3 "/dev/vda is mounted on /srv"

CASE=swap
new_tree
echo '/dev/vda1                               partition	1048572		0		-2' >>"$P/swaps"
vb bind 00:05.0
refusal 3 "/dev/vda1 is in use as swap"

CASE=holder
new_tree
mkdir -p "$S/devices/pci0000:00/0000:00:05.0/virtio2/block/vda/vda1/holders/dm-0"
vb bind 00:05.0
refusal 3 "/dev/vda1 is held by dm-0"

CASE=interface-up
new_tree
echo 0x1003 >"$S/class/net/eth0/flags"
vb bind 00:06.0
refusal 3 "refusing 0000:00:06.0: interface eth0 is up (ip link set dev eth0 down first)"

CASE=interface-routes
new_tree
printf 'eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n' >>"$P/net/route"
vb bind 00:06.0
refusal 3 "interface eth0 has 1 route(s)"

CASE=9p-share-mounted
vb bind 00:02.0
refusal 3 "its 9p share 'hostroot' is mounted on /"

CASE=all-or-nothing
new_tree
echo 0x1003 >"$S/class/net/eth0/flags"
vb bind 00:04.0 00:06.0
refusal 3 "eth0 is up"
expect "the good device is untouched too" driver_is 0000:00:04.0 virtio-pci

CASE=force
vb bind --force 00:06.0
expect "exit 0" rc 0
expect "warns about what it overrode" err_has "warning: refusing 0000:00:06.0: interface eth0 is up (ip link set dev eth0 down first) (ignored: --force)"
expect "bound to vfio-pci" driver_is 0000:00:06.0 vfio-pci

CASE=check
new_tree
vb check 00:05.0 00:06.0
expect "exit 0" rc 0
expect "says each can be bound" eval 'out_has "0000:00:05.0: can be bound to vfio-pci (driver now: virtio-pci" && out_has "0000:00:06.0: can be bound"'
expect "writes nothing" unchanged
echo '40 20 254:1 / /mnt/data rw,relatime - ext4 /dev/vda1 rw' >>"$P/self/mountinfo"
vb check 00:05.0
refusal 3 "refusing 0000:00:05.0: /dev/vda1 is mounted on /mnt/data"
new_tree
echo 0x1003 >"$S/class/net/eth0/flags"
vb check 00:04.0 00:06.0
refusal 3 "eth0 is up"
vb check 00:1f.2
refusal 3 "IOMMU group 7 also holds 0000:00:1f.0, bound to lpc_ich"
vb check --persist 00:05.0
expect "--persist is refused: exit 1" rc 1

CASE=bind
new_tree
vb bind 00:05.0
expect "exit 0" rc 0
expect "sysfs writes, in order" writes_are "bus/pci/devices/0000:00:05.0/driver_override <- vfio-pci
bus/pci/devices/0000:00:05.0/driver/unbind <- 0000:00:05.0
bus/pci/drivers_probe <- 0000:00:05.0"
expect "driver_override holds vfio-pci" override_is 0000:00:05.0 vfio-pci
expect "driver is vfio-pci" driver_is 0000:00:05.0 vfio-pci
expect "state file remembers virtio-pci" file_has "$T/state/0000:00:05.0" "driver=virtio-pci"
expect "says what it remembered" out_has "0000:00:05.0: remembered original driver virtio-pci in $T/state/0000:00:05.0"
expect "says it unbound" out_has "0000:00:05.0: unbound from virtio-pci"
expect "says it bound" out_has "0000:00:05.0: bound to vfio-pci (IOMMU group 4, $D/vfio/4)"
expect "no udev rule without --persist" absent "$T/rules"

CASE=already-bound
vb bind 0000:00:05.0 00:07.0
expect "exit 0" rc 0
expect "says so" out_has "0000:00:07.0: already bound to vfio-pci (IOMMU group 6, $D/vfio/6); nothing to do"
expect "changes nothing" unchanged

CASE=group-bound-together
new_tree
vb bind 00:1f.0 00:1f.2
expect "exit 0" rc 0
expect "both on vfio-pci" eval 'driver_is 0000:00:1f.0 vfio-pci && driver_is 0000:00:1f.2 vfio-pci'

CASE=bind-fails
new_tree
FAKE_FAIL_PROBE=1 vb bind 00:04.0
expect "exit 5" rc 5
expect "says vfio-pci did not take it" err_has "0000:00:04.0: vfio-pci did not take the device"
expect "rolled back to virtio-pci" eval 'driver_is 0000:00:04.0 virtio-pci && out_has "rolled back: driver is virtio-pci again"'
expect "driver_override cleared" override_is 0000:00:04.0 ''
expect "state file removed" absent "$T/state/0000:00:04.0"

CASE=persist
new_tree
vb bind --persist 00:05.0
expect "exit 0" rc 0
rule=$T/rules/89-vfio-bind-0000:00:05.0.rules
expect "says where it wrote" out_has "0000:00:05.0: persisted: wrote udev rule $rule"
expect "rule matches the device" file_has "$rule" 'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:00:05.0", ATTR{vendor}=="0x1af4", ATTR{device}=="0x1042", ATTR{driver_override}="vfio-pci"'
expect "rule is the documented format (udev/89-vfio-bind.rules.example)" \
	eval '[[ $(grep -v "^#" "$rule") == "$(grep -v "^#" "$REPO/udev/89-vfio-bind.rules.example")" ]]'

CASE=restore
vb restore 00:05.0
expect "exit 0" rc 0
expect "bound back through drivers/virtio-pci/bind" eval 'driver_is 0000:00:05.0 virtio-pci && tail -n 3 "$T/writes.log" | grep -qxF "bus/pci/drivers/virtio-pci/bind <- 0000:00:05.0"'
expect "driver_override cleared" override_is 0000:00:05.0 ''
expect "state file removed" absent "$T/state/0000:00:05.0"
expect "udev rule removed" eval 'absent "$rule" && out_has "removed udev rule $rule"'
expect "says it is back" out_has "0000:00:05.0: bound to virtio-pci"

CASE=unbind
new_tree
vb bind --persist 00:04.0
: >"$T/writes.log"
vb unbind 00:04.0
expect "exit 0" rc 0
expect "clears driver_override, unbinds, does not probe" writes_are "bus/pci/devices/0000:00:04.0/driver_override <- \\n
bus/pci/drivers/vfio-pci/unbind <- 0000:00:04.0"
expect "no driver" no_driver 0000:00:04.0
expect "state kept" file_has "$T/state/0000:00:04.0" "driver=virtio-pci"
expect "rule kept without --persist" file_has "$T/rules/89-vfio-bind-0000:00:04.0.rules" 'KERNEL=="0000:00:04.0"'
vb unbind --persist 00:04.0
expect "unbind --persist on an unbound device: exit 0" eval 'rc 0 && out_has "not bound to any driver"'
expect "unbind --persist removes the rule" absent "$T/rules/89-vfio-bind-0000:00:04.0.rules"
vb restore 00:04.0
expect "restore after unbind: virtio-pci again" eval 'rc 0 && driver_is 0000:00:04.0 virtio-pci'
expect "restore after unbind: state removed" absent "$T/state/0000:00:04.0"
vb bind 00:04.0
vb unbind 00:04.0
vb bind 00:04.0
expect "rebind after unbind keeps the first remembered driver" eval 'rc 0 && out_has "original driver virtio-pci already remembered"'

CASE=unbind-wrong-driver
vb unbind 00:06.0
refusal 2 "0000:00:06.0 is bound to virtio-pci, not vfio-pci"

CASE=restore-nothing-remembered
new_tree
vb restore 00:07.0
expect "exit 0" rc 0
expect "says so and probes" out_has "0000:00:07.0: no original driver remembered"
expect "used drivers_probe" eval 'tail -n 1 "$T/writes.log" | grep -qxF "bus/pci/drivers_probe <- 0000:00:07.0"'
expect "kernel driver took it" driver_is 0000:00:07.0 virtio-pci

CASE=restore-bind-fails
new_tree
vb bind 00:04.0
FAKE_FAIL_BIND=virtio-pci vb restore 00:04.0
expect "exit 0" rc 0
expect "falls back to drivers_probe" eval 'out_has "asking the kernel to probe instead" && driver_is 0000:00:04.0 virtio-pci'

CASE=group-in-use
new_tree
mkdir -p "$P/1234/fd" && echo virtio-vfio >"$P/1234/comm" && ln -s "$D/vfio/6" "$P/1234/fd/7"
vb unbind 00:07.0
refusal 3 "0000:00:07.0: its VFIO group 6 is open by process 1234 (virtio-vfio)"
vb restore 00:07.0
refusal 3 "open by process 1234 (virtio-vfio)"
vb unbind --force 00:07.0
expect "--force unbinds anyway" eval 'rc 0 && no_driver 0000:00:07.0'

CASE=noiommu
new_tree
mkdir -p "$S/module/vfio/parameters" && echo Y >"$S/module/vfio/parameters/enable_unsafe_noiommu_mode"
vb bind 00:08.0
expect "exit 0" rc 0
expect "warns" err_has "no-IOMMU mode"
expect "names the noiommu node" out_has "bound to vfio-pci (IOMMU group 100, $D/vfio/noiommu-100)"

CASE=status
new_tree
vb bind 00:04.0
vb status
expect "exit 0" rc 0
expect "writes nothing" unchanged
expect "blk listed as storage on a kernel driver" section_is 0000:00:05.0 "Storage devices bound to a kernel driver"
expect "blk line" out_has "0000:00:05.0 '$(if command -v lspci >/dev/null; then echo 'Virtio 1.0 block device'; else echo 1af4:1042; fi)' 1af4:1042 iommu_group=4 drv=virtio-pci virtio=blk block=vda"
expect "net on vfio-pci listed as such" section_is 0000:00:07.0 "Network devices bound to vfio-pci"
expect "net with interface" out_has "iommu_group=5 drv=virtio-pci virtio=net if=eth0"
expect "rng bound by us shows what is remembered" eval 'section_is 0000:00:04.0 "Other devices bound to vfio-pci" && out_has "virtio=rng override=vfio-pci remembered=virtio-pci"'
expect "9p root share marked active" out_has "virtio=9p *Active*"
expect "no-group device" out_has "0000:00:08.0 '"
expect "bridges hidden" eval '! out_has 0000:00:1c.0 && out_has "2 bridge(s) not shown"'
vb status --all
expect "--all lists bridges" out_has "0000:00:1c.0"
vb status --json
expect "--json: exit 0" rc 0
if command -v jq >/dev/null; then
	expect "--json is valid and complete" eval '[[ $(jq -r ".devices[] | select(.bdf == \"0000:00:05.0\") | [.virtio_type, .iommu_group, .binding, .block_devices[0]] | join(\" \")" <<<"$OUT") == "blk 4 kernel vda" ]]'
	expect "--json reports vfio-pci loaded" eval '[[ $(jq -r .vfio_pci_loaded <<<"$OUT") == true ]]'
elif command -v python3 >/dev/null; then
	expect "--json is valid" eval 'python3 -m json.tool >/dev/null <<<"$OUT"'
fi

CASE=json
# The document jq builds, byte for byte: key order, compact form, escapes (a quote and a
# backslash in a mount point), null and true/false; then a control character in an
# interface name, which JSON must escape (\u0001).
new_tree
printf '30 20 254:1 / /mnt/a"b\\c rw - ext4 /dev/vda1 rw\n' >>"$P/self/mountinfo"
vb bind 00:04.0
vb bind --persist 00:07.0
vb status --json
expect "exit 0" rc 0
expect "one line" eval '[[ $(wc -l <<<"$OUT") == 1 ]]'
expect "document head" eval '[[ $OUT == "{\"vfio_pci_loaded\":true,\"iommu_groups\":7,\"noiommu\":false,\"devices\":[{\"bdf\":\"0000:00:02.0\","* ]]'
if command -v lspci >/dev/null; then names='"vendor_name":"Red Hat, Inc.","device_name":"Virtio 1.0 block device"'; else names='"vendor_name":"","device_name":""'; fi
expect "blk object, mount point escaped" out_has '{"bdf":"0000:00:05.0","vendor_id":"1af4","device_id":"1042","class":"010000",'"$names"',"category":"storage","binding":"kernel","driver":"virtio-pci","driver_override":"","iommu_group":"4","virtio_type":"blk","interfaces":[],"block_devices":["vda"],"active":true,"in_use":["/dev/vda1 is mounted on /mnt/a\"b\\c (umount /mnt/a\"b\\c first)"],"remembered_driver":null,"persistent":false}'
expect "remembered driver" out_has '"iommu_group":"3","virtio_type":"rng","interfaces":[],"block_devices":[],"active":false,"in_use":[],"remembered_driver":"virtio-pci","persistent":false}'
expect "persistent, no remembered driver" out_has '"iommu_group":"6","virtio_type":"net","interfaces":[],"block_devices":[],"active":false,"in_use":[],"remembered_driver":null,"persistent":true}'
expect "no IOMMU group is an empty string" out_has '{"bdf":"0000:00:08.0","vendor_id":"1af4","device_id":"1044","class":"00ff00",'
expect "parses" eval 'jq -e ".devices | length == 7" >/dev/null <<<"$OUT"'
add_netif 0000:00:06.0 virtio3/net/e1x e$'\001'x 0x1002 down
vb status --json
expect "control character escaped" out_has '"interfaces":["e\u0001x","eth0"]'
expect "and parses back" eval '[[ $(jq -r ".devices[] | select(.bdf == \"0000:00:06.0\") | .interfaces[0]" <<<"$OUT") == e$'"'"'\001'"'"'x ]]'
vb status --all --json
expect "--all: bridges too" eval '[[ $(jq -r "[.devices[].bdf] | join(\" \")" <<<"$OUT") == "0000:00:02.0 0000:00:04.0 0000:00:05.0 0000:00:06.0 0000:00:07.0 0000:00:08.0 0000:00:1c.0 0000:00:1f.0 0000:00:1f.2" ]]'
rm -rf "$S/bus/pci/devices/"* "$S/kernel/iommu_groups/"*
vb status --json
expect "no devices: an empty list" eval '[[ $OUT == "{\"vfio_pci_loaded\":true,\"iommu_groups\":0,\"noiommu\":false,\"devices\":[]}" ]]'

CASE=device-types
# Every line of the table names its modern device 1af4:(1040 + ID); the transitional IDs
# 1000-103f take the type from the subsystem device ID, as the binary and Linux do; a type
# the table lacks prints as type-N.
new_tree
TYPES=$REPO/tools/virtio-device-types.tsv
n=0
while IFS=$'\t' read -r id tname; do
	[[ $id == '#'* || -z $id ]] && continue
	n=$((n + 1))
	add_pci "$(printf '0000:01:%02x.0' "$n")" 1af4 "$(printf %04x $((0x1040 + id)))" 00ff00 '' ''
	EXPECTED+=("$(printf '0000:01:%02x.0' "$n") $tname")
done <"$TYPES"
add_pci 0000:02:00.0 1af4 1000 020000 '' ''
echo 0x0001 >"$S/devices/pci0000:00/0000:02:00.0/subsystem_device"
add_pci 0000:02:01.0 1af4 1005 00ff00 '' ''
echo 0x0004 >"$S/devices/pci0000:00/0000:02:01.0/subsystem_device"
add_pci 0000:02:02.0 1af4 1001 010000 '' ''
echo 0x0003 >"$S/devices/pci0000:00/0000:02:02.0/subsystem_device"
add_pci 0000:02:03.0 1af4 1004 010000 '' ''
add_pci 0000:02:04.0 1af4 1072 00ff00 '' ''
add_pci 0000:02:05.0 1af4 1080 00ff00 '' ''
add_pci 0000:02:06.0 8086 1041 00ff00 '' ''
vb status --json
expect "the table has the types the binary knows" eval '((n >= 16))'
for e in "${EXPECTED[@]}"; do
	expect "${e#* }: 1af4:$(printf %04x $((0x1040 + $(awk -v n="${e#* }" -F'\t' '$2 == n { print $1 }' "$TYPES"))))" \
		eval '[[ $(jq -r ".devices[] | select(.bdf == \"${e%% *}\") | .virtio_type" <<<"$OUT") == "${e#* }" ]]'
done
vtype() { jq -r ".devices[] | select(.bdf == \"$1\") | .virtio_type" <<<"$OUT"; }
expect "transitional 1000, subsystem 1: net" eval '[[ $(vtype 0000:02:00.0) == net ]]'
expect "transitional 1005, subsystem 4: rng" eval '[[ $(vtype 0000:02:01.0) == rng ]]'
expect "transitional ID and subsystem disagree: the subsystem wins" eval '[[ $(vtype 0000:02:02.0) == console ]]'
expect "transitional without a subsystem ID: not identified" eval '[[ -z $(vtype 0000:02:03.0) ]]'
expect "a type the table lacks: type-N" eval '[[ $(vtype 0000:02:04.0) == type-50 ]]'
expect "past 107f: not virtio" eval '[[ -z $(vtype 0000:02:05.0) ]]'
expect "another vendor: not virtio" eval '[[ -z $(vtype 0000:02:06.0) ]]'
vb status
expect "text status: virtio=rng" eval 'grep -q "^0000:02:01.0 .* virtio=rng" <<<"$OUT"'
vb bind 00:04.0
expect "bind names the type" out_has "0000:00:04.0: virtio rng device"

CASE=device-types-lookup
# Where the table is found: VFIO_BIND_DEVICE_TYPES, next to the script (through a
# symbolic link too), ../share/virtio-vfio from it; missing or malformed, exit 4.
new_tree
VFIO_BIND_DEVICE_TYPES=$T/none.tsv vb status
expect "VFIO_BIND_DEVICE_TYPES unreadable: exit 4" eval 'rc 4 && err_has "VFIO_BIND_DEVICE_TYPES: cannot read"'
printf '4\trng\n2 blk\n' >"$T/bad.tsv"
VFIO_BIND_DEVICE_TYPES=$T/bad.tsv vb status
expect "malformed line: exit 4 naming it" eval 'rc 4 && err_has "$T/bad.tsv:2: not a device type line"'
VFIO_BIND_DEVICE_TYPES=$T/bad.tsv vb unbind 00:07.0
expect "unbind does not need the table" rc 0
printf '# mine\n4\tentropy\n' >"$T/mine.tsv"
VFIO_BIND_DEVICE_TYPES=$T/mine.tsv vb status
expect "VFIO_BIND_DEVICE_TYPES is read" eval 'rc 0 && out_has "virtio=entropy" && out_has "virtio=type-2 block=vda"'
mkdir -p "$T/prefix/bin" "$T/prefix/share/virtio-vfio" "$T/alone" "$T/links"
cp "$VB" "$T/prefix/bin/vfio-bind" && cp "$REPO/tools/virtio-device-types.tsv" "$T/prefix/share/virtio-vfio/"
cp "$VB" "$T/alone/vfio-bind"
ln -s "$VB" "$T/links/vfio-bind"
VBSAVED=$VB
VB=$T/prefix/bin/vfio-bind vb status
expect "installed: found in ../share/virtio-vfio" eval 'rc 0 && out_has "virtio=blk block=vda"'
VB=$T/links/vfio-bind vb status
expect "through a symbolic link: found next to the script" eval 'rc 0 && out_has "virtio=blk block=vda"'
VB=$T/alone/vfio-bind vb status
expect "nowhere: exit 4 saying where it looked" eval 'rc 4 && err_has "virtio-device-types.tsv is neither in $T/alone nor in $T/alone/../share/virtio-vfio"'
VB=$VBSAVED

CASE=real-host-status
T=$WORK/real && mkdir -p "$T"
OUT=$(VFIO_BIND_STATE_DIR="$T/state" VFIO_BIND_RULES_DIR="$T/rules" "$VB" status 2>"$WORK/stderr")
RC=$? ERR=$(<"$WORK/stderr")
expect "status on the real /sys: exit 0" rc 0
expect "status on the real /sys creates nothing" eval '[[ -z $(ls -A "$T") ]]'
OUT=$(VFIO_BIND_FAKE_KERNEL=/bin/true "$VB" status 2>"$WORK/stderr")
RC=$? ERR=$(<"$WORK/stderr")
expect "VFIO_BIND_FAKE_KERNEL refused with the real /sys" eval 'rc 1 && err_has "only for tests with a fake tree"'

CASE=shellcheck
if command -v shellcheck >/dev/null; then
	OUT=$(shellcheck "$VB" "$HERE/run.sh" "$FAKE_KERNEL" 2>&1)
	RC=$?
	expect "clean" rc 0
else
	echo "skip $CASE: shellcheck not installed"
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
