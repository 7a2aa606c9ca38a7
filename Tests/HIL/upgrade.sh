#!/usr/bin/env bash
# HIL test of hot upgrades (issue 6, first part): serve rng and serve blk handed between two
# driver builds (.build and .build-variant: -DVIRTIO_VFIO_NO_EVENT_IDX, another version and
# feature set) in reset and live mode with a client connected; live mode refused across feature
# sets; rollbacks when the successor crashes or fails its first request. Every command is bounded
# by `timeout`, so a hang fails a check instead of the run.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng blk
RNG=$(role rng) BLK=$(role blk)
A=$PWD/.build/debug/virtio-vfio
B=$PWD/.build-variant/debug/virtio-vfio
work=$(mktemp -d)
if [[ ! -x $B ]]; then fail "variant build $B missing (tools/test builds it)"; hil_summary upgrade; exit 1; fi
va=$($A --version) vb=$($B --version)
[[ $va != "$vb" ]] && pass "two builds: $va and $vb" || fail "the two builds report the same version $va"
vfio-bind bind $RNG >/dev/null && vfio-bind bind $BLK >/dev/null && pass "bound rng and blk" || fail "bind"

# upgrade BDF BINARY MODE [EXTRA...]: runs virtio-vfio upgrade (bounded), output in $OUT, status in $RC.
upgrade() {
  local bdf=$1 bin=$2 mode=$3; shift 3
  OUT=$(timeout 60 $A upgrade "$bdf" --binary "$bin" --mode "$mode" -- "$@" 2>>"$work/upgrade.log"); RC=$?
}
serving() { sed -nE 's/^after: pid ([0-9]+).*/\1/p' <<<"$OUT"; }
# served_by BDF: the pid of the driver serving BDF now (from `info`, over its control socket).
served_by() { timeout 10 $A info "$1" 2>/dev/null | sed -nE 's/^.*: served by pid ([0-9]+),.*/\1/p'; }

# ---- rng --------------------------------------------------------------------------------------
$A serve rng $RNG --rate 65536 --credit 0 2>"$work/rng.log" &
for _ in $(seq 50); do [[ -S /run/virtio-vfio/$RNG.sock ]] && break; sleep 0.1; done
upgrade $RNG "$B" reset
[[ $RC == 0 && $OUT == *"upgraded: $va -> $vb"* ]] && pass "rng: reset-mode upgrade $va -> $vb" || fail "rng reset upgrade: exit $RC: $OUT"
# VERSION_1 (bit 32) without EVENT_IDX (bit 29); ACCESS_PLATFORM (bit 33) behind an IOMMU only.
after=$(sed -nE 's/^after: pid [0-9]+, .*features (0x[0-9a-f]+).*/\1/p' <<<"$OUT")
[[ -n $after ]] && (((after >> 32 & 1) == 1 && (after >> 29 & 1) == 0)) && pass "rng: the new build negotiated without EVENT_IDX ($after)" || fail "rng features after: $OUT"
upgrade $RNG "$A" live
[[ $RC == 1 && $OUT == *"rolled back"* ]] && pass "rng: live mode across different feature sets is refused, the old driver keeps serving" || fail "rng live across features: exit $RC: $OUT"
grep -q "live mode needs the same features" <(cat "$work"/*.log) && pass "rng: the refusal names the feature difference" || fail "no feature-difference message"
upgrade $RNG "$A" reset
[[ $RC == 0 ]] && pass "rng: reset-mode upgrade back to $va" || fail "rng reset back: exit $RC: $OUT"
upgrade $RNG "$A" live
[[ $RC == 0 ]] && pass "rng: live-mode upgrade $va -> $va (rings adopted, no reset)" || fail "rng live: exit $RC: $OUT"
grep -q "in live mode" <(cat "$work"/*.log) && pass "rng: the successor reports the live takeover" || fail "rng log: $(grep -i took "$work/rng.log")"
# 16 more, alternating builds and modes as the blk acceptance does: 20 rng upgrades in all.
ok=0
for i in $(seq 16); do
  case $((i % 4)) in 1) bin=$B mode=reset ;; 2) bin=$B mode=live ;; 3) bin=$A mode=reset ;; 0) bin=$A mode=live ;; esac
  upgrade $RNG "$bin" $mode
  [[ $RC == 0 ]] && ok=$((ok + 1)) || echo "rng upgrade $((i + 4)) ($mode to $bin): $OUT"
done
[[ $ok == 16 ]] && pass "rng: 16 more upgrades alternating builds and modes" || fail "rng: $ok of 16 upgrades"
fed=$(grep -cE "fed [1-9][0-9]* bytes before the handover" "$work/rng.log" <(cat "$work"/*.log) | awk -F: '{ n += $2 } END { print n }')
[[ $fed -ge 19 ]] && pass "rng: each of the $fed handed-over drivers had fed the pool (serve rng keeps feeding)" || fail "rng: only $fed drivers report feeding before their handover"
pid=$(serving)
sleep 0.5
kill -TERM "$pid" 2>/dev/null
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
# Successors log where the driver they replace logs (the serving driver starts them): rng.log.
grep -qE "fed [0-9]+ bytes .*device reset" "$work/rng.log" && pass "rng: the last driver fed the pool and stopped with a reset" || fail "rng end: $(tail -3 "$work/rng.log")"

# ---- blk through nbd-client --------------------------------------------------------------------
sock=$work/nbd.sock
$A serve blk $BLK --nbd "unix:$sock" 2>"$work/blk.log" &
for _ in $(seq 50); do [[ -S $sock && -S /run/virtio-vfio/$BLK.sock ]] && break; sleep 0.1; done
check "nbd-client attaches" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N ""
head -c 8M /dev/urandom >"$work/data"
timeout 30 dd if="$work/data" of=/dev/nbd0 bs=1M oflag=direct conv=fsync status=none && pass "8 MiB written before the upgrades" || fail "write"
sum=$(sha256sum <"$work/data")
i=0 last=$(served_by $BLK)
for step in "$B reset" "$B live" "$A reset" "$A live"; do
  set -- $step; i=$((i + 1))
  upgrade $BLK "$1" "$2"
  [[ $RC == 0 ]] && pass "blk upgrade $i: $2 mode to $($1 --version), nbd-client stays connected" || fail "blk upgrade $i ($2): exit $RC: $OUT"
  [[ $RC == 0 ]] && last=$(serving)
  ((i == 1)) && { [[ $OUT == *"before: "*"FLUSH"* && $OUT != *"bit "* ]] && pass "blk: upgrade names the device's features (FLUSH, not bit 9)" || fail "blk feature names: $OUT"; }
  got=$(timeout 30 dd if=/dev/nbd0 bs=1M count=8 iflag=direct status=none | sha256sum)
  [[ $got == "$sum" ]] && pass "blk: data read back through the same connection after upgrade $i" || fail "blk: data differs after upgrade $i"
done
grep -E "took over" <(cat "$work"/*.log) | sed -E 's/^.*took over from driver ([^ ]+) in ([a-z]+) mode.*service gap (.*)$/  \2 mode from \1: service gap \3/'

# ---- rollbacks: the successor dies, or fails its first request ---------------------------------
for fault in crash-after-device-up first-request-fails; do
  before=$last
  upgrade $BLK "$B" reset --debug-fault $fault
  [[ $RC == 1 && $OUT == *"rolled back"* && $(served_by $BLK) == "$before" ]] && pass "rollback when the successor $fault: pid $before keeps serving" || fail "$fault: exit $RC: $OUT"
  got=$(timeout 30 dd if=/dev/nbd0 bs=1M count=8 iflag=direct status=none | sha256sum)
  [[ $got == "$sum" ]] && pass "blk: data intact and served after the $fault rollback" || fail "blk: data after $fault rollback"
done
# A successor that hangs: the old driver's deadline (--handover-timeout, 10 s by default) kills it.
t0=$(date +%s%N)
upgrade $BLK "$B" reset --debug-fault hang-after-device-up
t1=$(( ($(date +%s%N) - t0) / 1000000 ))
[[ $RC == 1 && $OUT == *"was not healthy within 10000 ms; killed it"* && $(served_by $BLK) == "$before" ]] && pass "rollback when the successor hangs: killed at the deadline after $t1 ms, pid $before keeps serving" || fail "hang: exit $RC after $t1 ms: $OUT"
grep -q "was not healthy within 10000 ms; killed it" <(cat "$work"/*.log) && pass "the old driver names the missed deadline" || fail "no deadline message"
got=$(timeout 30 dd if=/dev/nbd0 bs=1M count=8 iflag=direct status=none | sha256sum)
[[ $got == "$sum" ]] && pass "blk: data intact and served after the deadline rollback" || fail "blk: data after the deadline rollback"
grep -q "device reset and rebuilt after the failed upgrade" <(cat "$work"/*.log) && pass "the old driver reset and rebuilt the device after the rollback" || fail "no rebuild logged"

# Whoever runs `upgrade`, it returns: the new driver writes to the serving driver's log, not to
# this command's output (a script capturing stdout and stderr used to wait for the new driver).
OUT=$(timeout 60 $A upgrade $BLK --binary "$A" --mode live 2>&1); RC=$?
[[ $RC == 0 && $OUT == *"upgraded: "* ]] && pass "out=\$(virtio-vfio upgrade ... 2>&1) returns once upgraded" || fail "upgrade with 2>&1: exit $RC: $OUT"
[[ $OUT != *"took over from driver"* ]] && grep -q "took over from driver" "$work/blk.log" \
  && pass "the new driver logs where the serving driver logs (blk.log), not to the upgrade command" || fail "successor log: $OUT"
check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
pkill -TERM -f "serve blk $BLK" ; sleep 1
vfio-bind restore $RNG >/dev/null; vfio-bind restore $BLK >/dev/null
echo "--- logs (tail)"; tail -n 20 "$work/upgrade.log" "$work/blk.log"
hil_summary upgrade
