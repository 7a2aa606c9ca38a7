#!/usr/bin/env bash
# virtio-blk without an IOMMU (VFIO no-IOMMU mode, physical addresses, hugepage DMA memory)
# against the same driver behind the emulated intel-iommu (type1, IOVAs), and the kernel's
# virtio-blk in each guest: two guests booted one after the other by one run of this script,
# each running Benchmarks/HIL/blk-vs-kernel.sh on the same two disks (00:05.0 ours, 00:06.0 the
# kernel's). A guest cannot have both modes: with an IOMMU every device has a group, and
# no-IOMMU groups exist only for devices without one.
# Prints both tables and one of the ratios no-IOMMU / type1 for each driver.
# Run on the host: Benchmarks/HIL/noiommu-vs-type1.sh [SECONDS] (HIL_BUILD=0 to use the builds
# already there; see tools/hil/run).
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for mode in type1 noiommu; do
  args=()
  [[ $mode == noiommu ]] && args=(--noiommu)
  if ! tools/hil/run "${args[@]}" --timeout 900 -- Benchmarks/HIL/blk-vs-kernel.sh "$SECS" >"$out/$mode.log" 2>&1; then
    tail -n 30 "$out/$mode.log" >&2
    echo "noiommu-vs-type1: the $mode guest failed (log above)" >&2
    exit 1
  fi
  grep -E '^\| (randread|read|randwrite|write) \|' "$out/$mode.log" >"$out/$mode.rows" ||
    { echo "noiommu-vs-type1: no table in the $mode guest's output" >&2; exit 1; }
  echo "### $mode"
  grep -E '^(\||\()' "$out/$mode.log" | sed 's/\r$//'
  echo
done
echo "### no-IOMMU / type1"
echo "| pattern | qd | bs | kernel | ours, poll | ours, msix |"
echo "|---|---|---|---|---|---|"
# Columns of blk-vs-kernel.sh: pattern, qd, bs, kernel, ours poll, ratio, ours msix, ratio.
paste -d '\n' "$out/type1.rows" "$out/noiommu.rows" | awk -F'|' '
  function t(s) { gsub(/ /, "", s); return s }
  NR % 2 == 1 { k = t($5); p = t($6); m = t($8); next }
  {
    if (t($2) == "" || k + 0 == 0 || p + 0 == 0 || m + 0 == 0) { print "noiommu-vs-type1: unreadable row: " $0 > "/dev/stderr"; exit 1 }
    printf "| %s | %s | %s | %.2f | %.2f | %.2f |\n", t($2), t($3), t($4), t($5) / k, t($6) / p, t($8) / m
  }'
