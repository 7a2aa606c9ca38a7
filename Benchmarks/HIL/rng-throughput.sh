#!/usr/bin/env bash
# HIL throughput of virtio-rng: the kernel's driver (/dev/hwrng) and ours in each completion mode,
# in the same guest run, same device, same byte count. Prints a Markdown table with ratios.
# Run: tools/hil/run -- Benchmarks/HIL/rng-throughput.sh [BYTES]
set -euo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh # role: the device map (tools/hil/devices.map, or HIL_MAP)
need_roles rng
RNG=$(role rng)
BYTES=${1:-8000000}
now() { date +%s%N; }
mbps() { awk -v b="$BYTES" -v a="$1" -v z="$2" 'BEGIN { printf "%.2f", b * 1000 / (z - a) }'; }  # MB/s

t0=$(now); head -c "$BYTES" /dev/hwrng >/dev/null; t1=$(now)
kernel=$(mbps "$t0" "$t1")
vfio-bind bind $RNG >/dev/null
declare -A ours
for mode in poll msix hybrid; do
  t0=$(now); virtio-vfio rng $RNG --bytes "$BYTES" --irq "$mode" --quiet >/dev/null; t1=$(now)
  ours[$mode]=$(mbps "$t0" "$t1")
done
vfio-bind restore $RNG >/dev/null
echo "| driver | MB/s | ratio to kernel |"
echo "|---|---|---|"
echo "| kernel virtio-rng (/dev/hwrng) | $kernel | 1.00 |"
for mode in poll msix hybrid; do
  echo "| virtio-vfio, $mode | ${ours[$mode]} | $(awk -v o="${ours[$mode]}" -v k="$kernel" 'BEGIN { printf "%.2f", o / k }') |"
done
echo "($BYTES bytes each, $(uname -r), QEMU TCG guest, $(nproc) vCPU; whole-process time including device setup)"
