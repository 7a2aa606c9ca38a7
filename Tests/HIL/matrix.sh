#!/usr/bin/env bash
# HIL device matrix: the driver against virtio-blk devices configured unlike the fixed map
# (tools/hil/matrix.map, added by `tools/hil/run --matrix`): 16-entry queues, four 1024-entry
# queues, indirect descriptors/EVENT_IDX/discard/write-zeroes/WCE off, 4 KiB logical blocks,
# read-only, a packed-ring offer, a PCIe function with an FLR, a legacy-only device. Each device
# either works (I/O checked byte for byte in poll and MSI-X mode, bench without an error, ext4 over
# NBD with fsck, the kernel's virtio_blk reading our data back, no DMAR fault) or is refused with a
# message naming why.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
HIL_MAP=${HIL_MATRIX_MAP:-tools/hil/matrix.map}
# Every virtio-blk of the map (a `nodrive` device is another suite's: packed.sh).
roles=$(awk '$1 !~ /^#/ && NF >= 3 && $4 !~ /(^|,)nodrive(,|$)/ { print $1 }' "$HIL_MAP")
# shellcheck disable=SC2086 # one word per role
need_roles $roles
work=$(mktemp -d -p /run)
sock=$work/nbd.sock
mnt=$work/mnt; mkdir -p "$mnt"
capacity=131072  # 64 MiB images (tools/hil/run --matrix)

flags_of() { awk -v r="$1" '$1 == r { print $4 }' "$HIL_MAP"; }
kernel_disk() { local d; for d in /sys/bus/pci/devices/$1/virtio*/block/*; do [[ -e $d ]] && basename "$d"; done; }
# DMAR faults the guest kernel logged for function $1 (the vIOMMU's record of a device touching
# memory it was not given).
dmar_faults() { dmesg | grep -c "DMAR.*fault.*${1#0000:}" || true; }

start_server() {
  rm -f "$sock"
  virtio-vfio serve blk "$1" --nbd "unix:$sock" 2>"$work/serve.log" &
  server=$!
  for _ in $(seq 150); do [[ -S $sock ]] && return 0; sleep 0.1; done
  fail "serve blk $1 did not start: $(cat "$work/serve.log")"; return 1
}
stop_server() { kill -TERM "$server" 2>/dev/null; wait "$server"; }

# A device that must work. $1 role, $2 address, $3 flags.
works() {
  local r=$1 B=$2 flags=$3 readonly=0 disk id info bs faults
  [[ ,$flags, == *,readonly,* ]] && readonly=1
  disk=$(kernel_disk "$B")
  [[ -n $disk ]] && pass "$r: the kernel's virtio_blk drives it as /dev/$disk" || fail "$r: no kernel disk for $B"
  faults=$(dmar_faults "$B")
  check "$r: bind" vfio-bind bind "$B" >/dev/null
  info=$(virtio-vfio info "$B" 2>&1) || fail "$r: info: $info"
  id=$(virtio-vfio blk id "$B" 2>&1) || fail "$r: blk id: $id"
  contains "$r: blk id reads the capacity" "$id" "capacity: $capacity sectors"
  bs=$(sed -n 's/.*block size \([0-9]*\).*/\1/p' <<<"$id")
  case $r in
    blk-4k) [[ $bs == 4096 ]] && pass "$r: block size 4096 (blk_size)" || fail "$r: block size '$bs': $id" ;;
    blk-q1024x4) contains "$r: info shows four 1024-entry queues" "$info" "queue 3: max size 1024" ;;
    blk-q16) contains "$r: info shows a 16-entry queue" "$info" "queue 0: max size 16" ;;
    blk-plain) [[ $info != *RING_INDIRECT_DESC* && $info != *RING_EVENT_IDX* ]] \
      && pass "$r: neither RING_INDIRECT_DESC nor RING_EVENT_IDX offered" || fail "$r: features: $info" ;;
    blk-packed)
      contains "$r: RING_PACKED offered: info says --ring auto takes the packed ring" "$info" "Ring: packed with --ring auto (RING_PACKED offered)"
      contains "$r: blk id runs on the packed ring" "$id" "ring: packed" ;;
    blk-pcie)
      contains "$r: VFIO reports a device reset (PCIe FLR)" "$info" "device reset supported"
      out=$(virtio-vfio reset "$B" --function 2>&1)
      contains "$r: reset --function: VFIO_DEVICE_RESET, then status reads 0" "$out" "function reset (VFIO_DEVICE_RESET): status reads 0"
      contains "$r: reset --function: then a fresh negotiation" "$out" "1 cycle ok" ;;
  esac
  [[ $bs =~ ^[0-9]+$ ]] || bs=512

  if ((readonly)); then
    contains "$r: blk id says read-only" "$id" "read-only: true"
    expect_exit 64 "$r: a write is refused before the device sees it" sh -c "head -c 4096 /dev/zero | virtio-vfio blk write $B --sector 2048"
    contains "$r: the refusal names VIRTIO_BLK_F_RO" "$LAST_ERR" "read-only (VIRTIO_BLK_F_RO)"
    virtio-vfio blk read "$B" --sector 2048 --count 2048 | cmp -s - <(head -c $((1 << 20)) /dev/zero) \
      && pass "$r: 1 MiB read (the image's zeros)" || fail "$r: read of a read-only device"
  else
    head -c $((1 << 20)) /dev/urandom >"$work/$r.pattern"
    for mode in poll msix; do
      virtio-vfio blk write "$B" --sector 2048 --flush --irq $mode <"$work/$r.pattern" 2>/dev/null \
        && virtio-vfio blk read "$B" --sector 2048 --count 2048 --irq $mode | cmp -s - "$work/$r.pattern" \
        && pass "$r: 1 MiB write + flush + read back, $mode" || fail "$r: round trip in $mode mode"
    done
  fi
  if [[ $r == blk-4k ]]; then
    expect_exit 64 "$r: 512 bytes at sector 1 refused before the device sees them" sh -c "head -c 512 /dev/zero | virtio-vfio blk write $B --sector 1"
    contains "$r: the refusal names blk_size" "$LAST_ERR" "logical blocks are 4096 bytes (blk_size)"
  fi

  # Reads at every depth the queues take; four queues of 1024 entries on blk-q1024x4.
  local bench_args=(--qd 1 32) want_qd=32
  [[ $r == blk-q1024x4 ]] && bench_args=(--qd 1 1024 --queues 4) want_qd=1024
  [[ $r == blk-q16 ]] && want_qd=16
  out=$(virtio-vfio bench blk "$B" "${bench_args[@]}" --bs 4096 --irq msix --seconds 2 --span $((capacity * 512)) --json 2>"$work/bench.err")
  local want_ring=split
  [[ $r == blk-packed ]] && want_ring=packed
  if [[ $(jq -r 'map(.errors) | add' <<<"$out") == 0 && $(jq -r 'map(.requests > 0) | all' <<<"$out") == true \
        && $(jq -r 'map(.qd) | max' <<<"$out") == "$want_qd" && $(jq -r 'map(.ring) | unique | join(",")' <<<"$out") == "$want_ring" ]]; then
    pass "$r: bench blk ${bench_args[*]}: no errors, qd up to $want_qd, $want_ring ring ($(jq -r 'map("qd \(.qd): \(.iops | floor) IOPS") | join(", ")' <<<"$out"))"
  else
    fail "$r: bench blk ${bench_args[*]}: $out $(cat "$work/bench.err")"
  fi

  # ext4 over NBD (read-only: the export says so and the client can only read).
  if start_server "$B"; then
    local min; min=$(nbdinfo --json "nbd+unix:///?socket=$sock" | jq -r '.exports[0].block_size_minimum')
    [[ $min == "$bs" ]] && pass "$r: NBD export's minimum block size is $bs" || fail "$r: NBD block_size_minimum $min, device $bs"
    if ((readonly)); then
      [[ $(nbdinfo --json "nbd+unix:///?socket=$sock" | jq -r '.exports[0].is_read_only') == true ]] \
        && pass "$r: the NBD export is read-only" || fail "$r: NBD export not read-only"
    elif nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" >/dev/null 2>&1; then
      if mkfs.ext4 -q -F /dev/nbd0 && mount /dev/nbd0 "$mnt"; then
        head -c $((3 << 20)) /dev/urandom >"$mnt/data"
        (cd "$mnt" && sha256sum data >"$work/$r.sum")
        umount "$mnt" && fsck.ext4 -f -n /dev/nbd0 >/dev/null 2>&1 \
          && pass "$r: ext4 over NBD: mkfs, 3 MiB file, fsck clean" || fail "$r: ext4 over NBD: fsck"
      else
        fail "$r: mkfs.ext4/mount over NBD"
      fi
      nbd-client -d /dev/nbd0 >/dev/null 2>&1
    else
      fail "$r: nbd-client could not attach"
    fi
    stop_server
  fi

  check "$r: restore to the kernel" vfio-bind restore "$B" >/dev/null
  sleep 0.3
  disk=$(kernel_disk "$B")
  if ((!readonly)) && [[ -n $disk ]]; then
    fsck.ext4 -f -n "/dev/$disk" >/dev/null 2>&1 && mount -o ro "/dev/$disk" "$mnt" \
      && (cd "$mnt" && sha256sum -c --quiet "$work/$r.sum") \
      && pass "$r: the kernel's virtio_blk: fsck clean, the file's checksum matches" || fail "$r: the kernel's view of the filesystem"
    umount "$mnt" 2>/dev/null
  fi
  local after; after=$(dmar_faults "$B")
  [[ $after == "$faults" ]] && pass "$r: no DMAR fault for $B" || fail "$r: $((after - faults)) DMAR faults: $(dmesg | grep "DMAR.*fault.*${B#0000:}" | tail -n 3)"
}

# A device that must be refused by name. $1 role, $2 address.
refused() {
  local r=$1 B=$2
  check "$r: bind (the bind script takes any function)" vfio-bind bind "$B" >/dev/null
  expect_exit 76 "$r: info refuses it" virtio-vfio info "$B"
  contains "$r: the refusal says it is legacy-only" "$LAST_ERR" "not a modern (virtio 1.x) virtio-pci device but a legacy-only one"
  expect_exit 76 "$r: blk id refuses it" virtio-vfio blk id "$B"
  check "$r: restore" vfio-bind restore "$B" >/dev/null
}

for r in $roles; do
  B=$(role "$r")
  flags=$(flags_of "$r")
  echo "== $r ($B): $(awk -v r="$r" '$1 == r { print $3 }' "$HIL_MAP") $flags"
  if [[ ,$flags, == *,refused,* ]]; then refused "$r" "$B"; else works "$r" "$B" "$flags"; fi
done
# A function on the root bus has no reset method: reset --function says so.
B=$(role blk-q16)
vfio-bind bind "$B" >/dev/null
expect_exit 69 "blk-q16 (root bus): reset --function is refused" virtio-vfio reset "$B" --function
contains "the refusal says VFIO has no reset method" "$LAST_ERR" "VFIO reports no reset method"
vfio-bind restore "$B" >/dev/null
rm -rf "$work"
hil_summary matrix
