#!/usr/bin/env bash
# virtio-blk: the guest kernel's driver (fio, libaio, O_DIRECT on blk1, 00:06.0) against ours
# (virtio-vfio bench blk on blk0, 00:05.0) on two identical QEMU disks, in the same guest run;
# ours is the release build unless VIRTIO_VFIO names another binary.
# Prints a Markdown table with IOPS and the ratio ours/kernel at each queue depth.
# Run: tools/hil/run -- Benchmarks/HIL/blk-vs-kernel.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh # role: the device map (tools/hil/devices.map, or HIL_MAP)
need_roles blk blk-baseline
OURS=$(role blk) KERNEL=$(role blk-baseline)
SECS=${1:-5}
BIN=${VIRTIO_VFIO:-$PWD/.build/release/virtio-vfio}
[[ -x $BIN ]] || { echo "no $BIN: swift build -c release --product virtio-vfio" >&2; exit 2; }
kdev=/dev/$(ls /sys/bus/pci/devices/$KERNEL/virtio*/block | head -n1)
vfio-bind bind $OURS >/dev/null
echo "| pattern | qd | bs | kernel IOPS (fio) | ours IOPS, poll | ratio | ours IOPS, msix | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for spec in "randread 1 4096" "randread 32 4096" "read 32 131072"; do
  set -- $spec
  kernel=$(fio --name=k --filename="$kdev" --direct=1 --ioengine=libaio --rw="$1" --bs="$3" --iodepth="$2" \
             --runtime="$SECS" --time_based --size=256M --output-format=json 2>/dev/null |
           python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"], 1))')
  row="| $1 | $2 | $3 | $kernel"
  for mode in poll msix; do
    ours=$("$BIN" bench blk $OURS --pattern "$1" --qd "$2" --bs "$3" --irq $mode --seconds "$SECS" --json 2>/dev/null |
           python3 -c 'import json,sys; print(round(json.load(sys.stdin)[0]["iops"], 1))')
    row+=" | $ours | $(python3 -c "print(round($ours / $kernel, 2))")"
  done
  echo "$row |"
done
vfio-bind restore $OURS >/dev/null
echo
echo "($SECS s per cell, $("$BIN" --version) from $BIN, $(uname -r), QEMU $(cat /sys/class/dmi/id/product_version 2>/dev/null || echo TCG) TCG, $(nproc) vCPU, 256 MiB raw image files on the host)"
