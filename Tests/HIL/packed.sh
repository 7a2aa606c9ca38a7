#!/usr/bin/env bash
# HIL test of the packed virtqueue (virtio 1.2 §2.8, issue 16) on QEMU devices that offer it
# (packed=on: rng-packed and blk-packed in tools/hil/matrix.map, added by tools/hil/run --matrix):
# rngtest on the packed ring in poll and MSI-X mode and on the split ring of the same device;
# --ring packed refused by name on a device without RING_PACKED; serve rng upgraded across a
# packed ring (live refused by name with the old driver serving on, auto and reset taking over by
# reset); bench blk split against packed against the kernel's virtio_blk on the same device at
# qd 1 and 32; ext4 over NBD on the packed ring through reset-mode upgrades under reads, checksums
# and fsck. (matrix.sh covers blk-packed's I/O in both modes, ext4 and the kernel reading it back.)
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
HIL_MAP=${HIL_MATRIX_MAP:-tools/hil/matrix.map}
need_roles rng-packed blk-packed
RNGP=$(role rng-packed) BLKP=$(role blk-packed)
RNG=$(HIL_MAP=tools/hil/devices.map role rng)
A=$PWD/.build/debug/virtio-vfio
work=$(mktemp -d -p /run)
mnt=$work/mnt; mkdir -p "$mnt"

# ---- rng ---------------------------------------------------------------------------------------
check "rng-packed: bind" vfio-bind bind "$RNGP" >/dev/null
info=$($A info "$RNGP" 2>&1)
contains "rng-packed: info says --ring auto takes the packed ring" "$info" "Ring: packed with --ring auto (RING_PACKED offered)"
for run in "poll packed" "msix packed" "poll split"; do
  set -- $run
  $A rng "$RNGP" --bytes 2500000 --irq "$1" --ring "$2" 2>"$work/summary" | rngtest >"$work/rngtest" 2>&1
  ok=$(sed -nE 's/.*FIPS 140-2 successes: ([0-9]+).*/\1/p' "$work/rngtest")
  bad=$(sed -nE 's/.*FIPS 140-2 failures: ([0-9]+).*/\1/p' "$work/rngtest")
  if [[ -n $ok && $ok -ge 995 && ${bad:-99} -le 4 ]] && grep -q "2500000 bytes .*, $1 mode, $2 ring, " "$work/summary"; then
    pass "rng-packed, --ring $2, $1 mode: rngtest $ok successes, $bad failures"
  else
    fail "rng-packed, --ring $2, $1 mode: successes '$ok' failures '$bad': $(cat "$work/summary") $(tail -n 5 "$work/rngtest")"
  fi
done

check "rng (split only): bind" vfio-bind bind "$RNG" >/dev/null
expect_exit 69 "rng without RING_PACKED: --ring packed is refused" $A rng "$RNG" --bytes 16 --ring packed
contains "the refusal names RING_PACKED" "$LAST_ERR" "RING_PACKED"
n=$($A rng "$RNG" --bytes 4096 2>/dev/null | wc -c)
[[ $n == 4096 ]] && pass "rng: the device works after the refusal (4096 bytes)" || fail "rng after the refusal: $n bytes"
check "rng: restore" vfio-bind restore "$RNG" >/dev/null

# upgrade BDF MODE: the serving driver hands BDF to this build (bounded); output in $OUT, status in $RC.
upgrade() { OUT=$(timeout 60 $A upgrade "$1" --binary "$A" --mode "$2" 2>>"$work/upgrade.log"); RC=$?; }
# stop BDF LOG: SIGTERM to the driver serving BDF; it must be gone within 30 s (else its state is
# shown and it is killed, so the device can be given back).
stop() {
  local pid t
  pid=$(timeout 10 $A info "$1" 2>/dev/null | sed -nE 's/^.*: served by pid ([0-9]+),.*/\1/p')
  [[ -n $pid ]] || { fail "$1: no driver answers on its control socket"; return; }
  kill -TERM "$pid"
  for t in $(seq 300); do [[ -d /proc/$pid && $(awk '{ print $3 }' /proc/$pid/stat 2>/dev/null) != Z ]] || break; sleep 0.1; done
  if [[ -d /proc/$pid && $(awk '{ print $3 }' /proc/$pid/stat 2>/dev/null) != Z ]]; then
    fail "$1: the driver (pid $pid) did not stop within 30 s of SIGTERM: state $(awk '{ print $3 }' /proc/$pid/stat), wchan $(cat /proc/$pid/wchan 2>/dev/null); $(tail -n 3 "$2")"
    kill -KILL "$pid"; sleep 0.5
  else
    pass "$1: the driver stopped on SIGTERM in $((t / 10)).$((t % 10)) s"
  fi
}
served_features() { timeout 10 $A info "$1" 2>/dev/null | sed -n '/^Negotiated features/{n;p}'; }

$A serve rng "$RNGP" --rate 65536 --credit 0 2>"$work/rng.log" &
for _ in $(seq 50); do [[ -S /run/virtio-vfio/$RNGP.sock ]] && break; sleep 0.1; done
contains "serve rng runs the packed ring" "$(served_features "$RNGP")" "RING_PACKED"
upgrade "$RNGP" live
[[ $RC == 1 && $OUT == *"rolled back"* ]] && pass "serve rng: live mode on a packed ring is refused, the old driver serves on" \
  || fail "serve rng live on packed: exit $RC: $OUT"
grep -q "is not handed over live" "$work/upgrade.log" "$work/rng.log" && pass "the refusal says the packed ring is not handed over live" \
  || fail "no packed-ring refusal logged: $(tail -n 5 "$work/upgrade.log")"
for mode in auto reset; do
  upgrade "$RNGP" $mode
  [[ $RC == 0 && $OUT == *"upgraded: "* ]] && pass "serve rng: $mode-mode upgrade takes the packed device over by reset" \
    || fail "serve rng $mode on packed: exit $RC: $OUT"
  contains "serve rng after the $mode upgrade runs the packed ring again" "$(served_features "$RNGP")" "RING_PACKED"
done
stop "$RNGP" "$work/rng.log"
grep -qE "fed [0-9]+ bytes .*device reset" "$work/rng.log" && pass "serve rng stopped with a reset" || fail "serve rng end: $(tail -n 3 "$work/rng.log")"
check "rng-packed: restore" vfio-bind restore "$RNGP" >/dev/null

# ---- blk: split against packed against the kernel, same device, same run ------------------------
disk=
for d in /sys/bus/pci/devices/$BLKP/virtio*/block/*; do [[ -e $d ]] && disk=$(basename "$d"); done
declare -A kernel
if [[ -n $disk ]]; then
  # The kernel's negotiated features, bit 0 first: does its virtio_blk run the packed ring too?
  kfeatures=$(cat /sys/bus/pci/devices/$BLKP/virtio*/features 2>/dev/null)
  [[ ${kfeatures:34:1} == 1 ]] && kring=packed || kring=split
  for qd in 1 32; do
    kernel[$qd]=$(fio --name=k --filename="/dev/$disk" --direct=1 --ioengine=libaio --rw=randread --bs=4096 --iodepth=$qd \
                  --runtime=3 --time_based --size=32M --output-format=json 2>/dev/null \
                  | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
  done
  [[ ${kernel[1]:-0} -gt 0 && ${kernel[32]:-0} -gt 0 ]] && pass "blk-packed, kernel virtio_blk on the $kring ring (fio randread 4 KiB): qd 1 ${kernel[1]} IOPS, qd 32 ${kernel[32]} IOPS" \
    || fail "fio on /dev/$disk: '${kernel[1]:-}' '${kernel[32]:-}'"
else
  fail "blk-packed: no kernel disk for $BLKP"
fi
check "blk-packed: bind" vfio-bind bind "$BLKP" >/dev/null
declare -A ours
for ring in split packed; do
  out=$($A bench blk "$BLKP" --ring $ring --qd 1 32 --bs 4096 --irq poll --seconds 3 --span $((32 << 20)) --json 2>"$work/bench.err")
  if [[ $(jq -r 'map(.errors) | add' <<<"$out") == 0 && $(jq -r "map(.ring == \"$ring\") | all" <<<"$out") == true ]]; then
    for qd in 1 32; do ours[$ring.$qd]=$(jq -r ".[] | select(.qd == $qd) | .iops | floor" <<<"$out"); done
    pass "blk-packed, ours --ring $ring (poll): qd 1 ${ours[$ring.1]} IOPS, qd 32 ${ours[$ring.32]} IOPS, no errors"
  else
    fail "bench blk --ring $ring: $out $(cat "$work/bench.err")"
  fi
done
if [[ -n ${ours[packed.1]:-} && -n ${ours[split.1]:-} && -n ${kernel[1]:-} ]]; then
  for qd in 1 32; do
    printf '  qd %-3s packed/split %s, packed/kernel %s\n' $qd \
      "$(awk -v a="${ours[packed.$qd]}" -v b="${ours[split.$qd]}" 'BEGIN { printf "%.2f", a / b }')" \
      "$(awk -v a="${ours[packed.$qd]}" -v b="${kernel[$qd]}" 'BEGIN { printf "%.2f", a / b }')"
  done
fi

# ---- blk: ext4 over NBD on the packed ring, upgraded under reads --------------------------------
sock=$work/nbd.sock
$A serve blk "$BLKP" --nbd "unix:$sock" 2>"$work/blk.log" &
for _ in $(seq 50); do [[ -S $sock && -S /run/virtio-vfio/$BLKP.sock ]] && break; sleep 0.1; done
contains "serve blk runs the packed ring" "$(served_features "$BLKP")" "RING_PACKED"
if timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" >/dev/null 2>&1; then
  pass "nbd-client attaches"
  if mkfs.ext4 -q -F /dev/nbd0 && mount /dev/nbd0 "$mnt"; then
    for i in 1 2 3; do head -c $((2 << 20)) /dev/urandom >"$mnt/file$i"; done
    (cd "$mnt" && sha256sum file1 file2 file3 >"$work/sums") && sync
    # Reads through the page cache's back (O_DIRECT) while the driver changes hands.
    ( while :; do dd if=/dev/nbd0 of=/dev/null bs=1M count=16 iflag=direct status=none || exit 1; done ) &
    reader=$!
    for mode in auto reset; do
      upgrade "$BLKP" $mode
      [[ $RC == 0 ]] && pass "serve blk: $mode-mode upgrade of the packed ring under reads, nbd-client stays connected" \
        || fail "serve blk $mode on packed: exit $RC: $OUT"
      contains "serve blk after the $mode upgrade runs the packed ring" "$(served_features "$BLKP")" "RING_PACKED"
    done
    kill -0 $reader 2>/dev/null && pass "the reader ran through both upgrades without an I/O error" || fail "the reader stopped with an I/O error"
    kill $reader 2>/dev/null; wait $reader 2>/dev/null
    echo 3 >/proc/sys/vm/drop_caches
    (cd "$mnt" && sha256sum -c --quiet "$work/sums") && pass "the files' checksums match after the upgrades" || fail "checksums differ"
    umount "$mnt" && fsck.ext4 -f -n /dev/nbd0 >/dev/null 2>&1 && pass "fsck clean after the upgrades" || fail "fsck after the upgrades"
  else
    fail "mkfs.ext4/mount over NBD"
  fi
  nbd-client -d /dev/nbd0 >/dev/null 2>&1
else
  fail "nbd-client could not attach: $(tail -n 3 "$work/blk.log")"
fi
stop "$BLKP" "$work/blk.log"
check "blk-packed: restore" vfio-bind restore "$BLKP" >/dev/null
echo "--- logs (tail)"; tail -n 8 "$work/upgrade.log" "$work/blk.log" 2>/dev/null
rm -rf "$work"
hil_summary packed
