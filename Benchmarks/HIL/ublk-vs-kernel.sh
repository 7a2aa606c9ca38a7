#!/usr/bin/env bash
# virtio-blk through ublk against the guest kernel's virtio-blk driver and against NBD, in one run
# of the 6.12 guest: fio (libaio, O_DIRECT, randread) on the kernel's disk (blk1, 00:06.0), on
# /dev/ublkbN and on /dev/nbd0 (nbd-client over a UNIX socket), the last two exported by one
# `serve blk 00:05.0 --ublk --nbd` (a release build unless VIRTIO_VFIO says otherwise). Prints
# a Markdown table with IOPS and the ratios to the kernel.
# Run: tools/hil/run --kernel 6.12 --smp 1 -- Benchmarks/HIL/ublk-vs-kernel.sh [SECONDS] [IRQ]
set -euo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh # role: the device map (tools/hil/devices.map, or HIL_MAP)
need_roles blk blk-baseline
OURS=$(role blk) KERNEL=$(role blk-baseline)
SECS=${1:-5} IRQ=${2:-msix}
BIN=${VIRTIO_VFIO:-$PWD/.build/release/virtio-vfio}
[[ -x $BIN ]] || { echo "no $BIN: swift build -c release --product virtio-vfio" >&2; exit 2; }
[[ -e /dev/ublk-control ]] || { echo "no ublk on $(uname -r): use the 6.12 guest (--kernel 6.12)" >&2; exit 2; }
kdev=/dev/$(ls /sys/bus/pci/devices/$KERNEL/virtio*/block | head -n1)
work=$(mktemp -d)
vfio-bind bind $OURS >/dev/null
"$BIN" serve blk $OURS --ublk --nbd "unix:$work/nbd.sock" --irq "$IRQ" 2>"$work/serve.log" &
server=$!
for _ in $(seq 600); do grep -q "/dev/ublkb[0-9]* serving" "$work/serve.log" && break; sleep 0.05; done
udev=$(grep -o '/dev/ublkb[0-9]*' "$work/serve.log" | head -n1)
timeout 20 nbd-client -unix "$work/nbd.sock" /dev/nbd0 -b 4096 -N "" >/dev/null 2>&1
iops() {
  fio --name=b --filename="$1" --direct=1 --ioengine=libaio --rw=randread --bs="$3" --iodepth="$2" \
      --runtime="$SECS" --time_based --size=256M --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"], 1))'
}
echo "| randread | qd | kernel virtio-blk IOPS | ublk IOPS | ratio | NBD IOPS | ratio | ublk / NBD |"
echo "|---|---|---|---|---|---|---|---|"
for spec in "1 4096" "32 4096" "32 131072"; do
  set -- $spec
  k=$(iops "$kdev" "$1" "$2"); u=$(iops "$udev" "$1" "$2"); n=$(iops /dev/nbd0 "$1" "$2")
  echo "| $2 B | $1 | $k | $u | $(python3 -c "print(round($u / $k, 2))") | $n | $(python3 -c "print(round($n / $k, 2))") | $(python3 -c "print(round($u / $n, 2))") |"
done
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
kill -TERM $server; wait $server || true
vfio-bind restore $OURS >/dev/null
echo
echo "($SECS s per cell, $(uname -r), $(nproc) vCPU, serve blk --irq $IRQ, $("$BIN" --version) from $BIN, 256 MiB raw image files on the host)"
rm -rf "$work"
