#!/usr/bin/env bash
# HIL test of the virtio core with virtio-rng (issue 4): entropy quality in each completion mode,
# reset/renegotiate loops with alternating feature sets, per-queue reset, serve rng, refusals.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng
RNG=$(role rng) BLK=$(role blk)
work=$(mktemp -d)

check "bind rng" vfio-bind bind $RNG >/dev/null

# rngtest (rng-tools5) over 2.5 MB: 999 FIPS 140-2 blocks; a good source fails about 0.1% of them.
for mode in poll msix hybrid; do
  virtio-vfio rng $RNG --bytes 2500000 --irq $mode 2>"$work/summary" | rngtest >"$work/rngtest" 2>&1
  ok=$(sed -nE 's/.*FIPS 140-2 successes: ([0-9]+).*/\1/p' "$work/rngtest")
  bad=$(sed -nE 's/.*FIPS 140-2 failures: ([0-9]+).*/\1/p' "$work/rngtest")
  cat "$work/summary"
  [[ -n $ok && $ok -ge 995 && ${bad:-99} -le 4 ]] && pass "rngtest, $mode mode: $ok successes, $bad failures" \
    || fail "rngtest, $mode mode: successes '$ok' failures '$bad': $(tail -n 12 "$work/rngtest")"
  grep -q "2500000 bytes" "$work/summary" && pass "$mode mode delivered 2500000 bytes" || fail "$mode summary: $(cat "$work/summary")"
  # The driver ran in the mode asked for, and its waits ended as that mode allows: poll never
  # sleeps on an interrupt, msix never polls, hybrid may do both. (A wait may also find the
  # buffers ready, so no mode has to show any particular kind of wait.)
  read -r interrupts polled rechecks < <(sed -nE 's/.*waits: ([0-9]+) interrupts, ([0-9]+) polled, ([0-9]+) rechecks.*/\1 \2 \3/p' "$work/summary")
  fits=0
  if [[ -n ${rechecks:-} ]]; then
    case $mode in
      poll) fits=$((interrupts == 0 && rechecks == 0)) ;;
      msix) fits=$((polled == 0)) ;;
      hybrid) fits=1 ;;
    esac
  fi
  grep -q ", $mode mode, " "$work/summary" && ((fits)) \
    && pass "$mode mode: waits ended by $interrupts interrupts, $polled polls, $rechecks rechecks" \
    || fail "$mode mode: the summary does not fit the mode: $(cat "$work/summary")"
done
# Small buffers, so the driver outruns the device and has to sleep on the eventfd; a device fast
# enough to have every buffer filled before each wait needs no interrupt at all (then try again).
for _ in 1 2 3; do
  virtio-vfio rng $RNG --bytes 300000 --buffer-size 64 --irq msix 2>"$work/summary" >/dev/null
  interrupts=$(sed -nE 's/.*waits: ([0-9]+) interrupts.*/\1/p' "$work/summary")
  [[ ${interrupts:-0} -gt 0 ]] && break
done
[[ ${interrupts:-0} -gt 0 ]] && pass "msix mode woke on $interrupts MSI-X interrupts" || fail "msix mode saw no interrupt: $(cat "$work/summary")"

# Reset and renegotiate 1000 times, alternating EVENT_IDX and INDIRECT_DESC, then read.
out=$(virtio-vfio reset $RNG --cycles 1000 --alternate RING_EVENT_IDX --alternate RING_INDIRECT_DESC --quiet)
contains "1000 reset cycles with alternating features" "$out" "1000 cycles ok"
n=$(virtio-vfio rng $RNG --bytes 65536 2>/dev/null | wc -c)
[[ $n == 65536 ]] && pass "rng reads 65536 bytes after 1000 resets" || fail "rng read $n bytes after the reset cycles"
for set in "RING_EVENT_IDX RING_INDIRECT_DESC" ""; do
  args=(); for f in $set; do args+=(--feature "$f"); done
  virtio-vfio reset $RNG --cycles 1 --keep --quiet "${args[@]}" >/dev/null
  negotiated=$(virtio-vfio info $RNG --json | jq -r '.negotiatedFeatureNames | join(" ")')
  if [[ -n $set ]]; then
    [[ $negotiated == *RING_EVENT_IDX* && $negotiated == *RING_INDIRECT_DESC* ]] && pass "info shows the negotiated set: $negotiated" \
      || fail "info after negotiating [$set]: $negotiated"
  else
    [[ $negotiated != *RING_EVENT_IDX* && $negotiated == *VERSION_1* ]] && pass "info shows the smaller set: $negotiated" \
      || fail "info after negotiating the base set: $negotiated"
  fi
  n=$(virtio-vfio rng $RNG --bytes 100000 --irq hybrid "${args[@]}" 2>/dev/null | wc -c)
  [[ $n == 100000 ]] && pass "rng with [${set:-base set}] reads 100000 bytes" || fail "rng with [$set] read $n bytes"
done

# Per-queue reset (VIRTIO_F_RING_RESET): the queue's buffers come back, the device keeps working.
out=$(virtio-vfio reset $RNG --queue 0 --cycles 5)
echo "$out"
[[ $(grep -c "buffers reclaimed, re-enabled; read 4096 bytes after" <<<"$out") == 5 ]] && pass "5 per-queue resets, each reclaiming the buffers" \
  || fail "per-queue reset: $out"
expect_exit 64 "queue 3 of the rng is refused" virtio-vfio reset $RNG --queue 3

# serve rng feeds the kernel pool.
out=$(virtio-vfio serve rng $RNG --rate 65536 --bytes 32768 2>&1); rc=$?
[[ $rc == 0 && $out == *"fed 32768 bytes"* ]] && pass "serve rng fed 32768 bytes to the kernel pool" || fail "serve rng: exit $rc: $out"

# Refusals.
if [[ -n $BLK ]]; then
  vfio-bind bind $BLK >/dev/null
  expect_exit 64 "rng on a virtio-blk device is refused" virtio-vfio rng $BLK --bytes 16
  contains "the refusal names the device type" "$LAST_ERR" "not virtio-rng"
  vfio-bind restore $BLK >/dev/null
else
  skip "rng on another device type: the device map $HIL_MAP has no blk role"
fi
expect_exit 64 "negative --bytes is refused" virtio-vfio rng $RNG --bytes -1

check "restore rng" vfio-bind restore $RNG >/dev/null
check "kernel virtio-rng works after restore" sh -c '[ "$(head -c 64 /dev/hwrng | wc -c)" = 64 ]'
rm -rf "$work"
hil_summary rng
