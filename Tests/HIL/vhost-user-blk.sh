#!/usr/bin/env bash
# HIL: a second implementation of the virtio-blk device side: vhost-user-blk served by
# qemu-storage-daemon at 0000:00:0a.0 (tools/hil/run --noiommu adds it; vhost-user cannot sit
# behind a vIOMMU, so it exists only in the no-IOMMU guest). The same driver, unchanged: I/O
# byte for byte in poll and MSI-X mode, bench without an error, ext4 over NBD with fsck and
# checksums, a hot upgrade of serve blk, and the data still there for the kernel's virtio_blk.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
VUB=0000:00:0a.0
work=$(mktemp -d -p /run)
sock=$work/nbd.sock
mnt=$work/mnt; mkdir -p "$mnt"
capacity=131072  # 64 MiB (tools/hil/run --noiommu)

[[ -e /sys/bus/pci/devices/$VUB ]] || { fail "no vhost-user-blk at $VUB (run under tools/hil/run --noiommu)"; hil_summary vhost-user-blk; exit 1; }
kdisk() { local d; for d in /sys/bus/pci/devices/$VUB/virtio*/block/*; do [[ -e $d ]] && basename "$d"; done; }
disk=$(kdisk)
[[ -n $disk ]] && pass "the kernel's virtio_blk drives the vhost-user-blk as /dev/$disk" || fail "no kernel disk for $VUB"
check "bind the vhost-user-blk" vfio-bind bind "$VUB" >/dev/null
info=$(virtio-vfio info "$VUB" 2>&1)
contains "info: a virtio-blk without an IOMMU" "$info" "NO IOMMU"
id=$(virtio-vfio blk id "$VUB" 2>&1)
contains "blk id reads the capacity from qemu-storage-daemon's config" "$id" "capacity: $capacity sectors"
head -c 3M /dev/urandom >"$work/data"
for irq in poll msix; do
  virtio-vfio blk write "$VUB" --irq "$irq" --sector 4096 <"$work/data" 2>"$work/err" \
    && virtio-vfio blk read "$VUB" --irq "$irq" --sector 4096 --count 6144 >"$work/back" 2>>"$work/err" \
    && cmp -s "$work/data" "$work/back" && pass "$irq: 3 MiB written and read back" || fail "$irq round trip: $(cat "$work/err")"
done
out=$(virtio-vfio bench blk "$VUB" --qd 1 --qd 32 --bs 4096 --seconds 2 --json 2>/dev/null)
[[ $(jq -r '[.[] | select(.errors == 0 and .requests > 0)] | length' <<<"$out") == 2 ]] \
  && pass "bench blk qd 1 and 32 without an error ($(jq -r '[.[] | "qd \(.qd) \(.iops | floor) IOPS"] | join(", ")' <<<"$out"))" \
  || fail "bench: $out"

virtio-vfio serve blk "$VUB" --nbd "unix:$sock" 2>"$work/serve.log" &
server=$!
for _ in $(seq 150); do [[ -S $sock && -S /run/virtio-vfio/$VUB.sock ]] && break; sleep 0.1; done
check "nbd-client attaches" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N ""
check "mkfs.ext4" mkfs.ext4 -q -F /dev/nbd0
check "mount" mount /dev/nbd0 "$mnt"
for i in 1 2 3; do head -c 2M /dev/urandom >"$mnt/f$i"; done
sync
sums=$(cd "$mnt" && sha256sum f*)
out=$(timeout 120 virtio-vfio upgrade "$VUB" --binary "$(command -v virtio-vfio)" --mode auto 2>&1); rc=$?
[[ $rc == 0 && $out == *"upgraded"* ]] && pass "hot upgrade of serve blk (auto) on the vhost-user-blk" || fail "upgrade: exit $rc: $out"
[[ $(cd "$mnt" && sha256sum f*) == "$sums" ]] && pass "checksums after the upgrade" || fail "checksums changed"
check "umount" umount "$mnt"
check "fsck" fsck.ext4 -f -n /dev/nbd0
nbd-client -d /dev/nbd0 >/dev/null 2>&1
pid=$(virtio-vfio info "$VUB" 2>/dev/null | sed -nE 's/^.*: served by pid ([0-9]+),.*/\1/p')
[[ -n $pid ]] && kill -TERM "$pid"
wait "$server" 2>/dev/null
for _ in $(seq 50); do [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
check "give it back to the kernel" vfio-bind restore "$VUB" >/dev/null
disk=$(kdisk)
if [[ -n $disk ]]; then
  check "the kernel mounts the ext4 we wrote" mount -o ro "/dev/$disk" "$mnt"
  [[ $(cd "$mnt" && sha256sum f* 2>/dev/null) == "$sums" ]] && pass "the kernel reads our files back (checksums)" || fail "kernel read-back"
  umount "$mnt"
else
  fail "no kernel disk after restore"
fi
rm -rf "$work"
hil_summary vhost-user-blk
