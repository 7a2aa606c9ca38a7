#!/usr/bin/env bash
# HIL soak (issue 20), run by tools/soak in a guest booted with systemd as init. In one run:
#   blk  00:05.0 as the systemd unit (descriptor store, --max-clients 64): ext4 (its first
#        128 MiB) on the kernel NBD client under fio with crc32c verification, run after run; and
#        SOAK_CLIENTS clients of our own (Tests/HIL/nbd-clients.py) on the same export, each
#        writing and checking every byte of its own 1 MiB past the filesystem, reconnecting after
#        a crash; a reader (gap-probe.py) measures the gap each event leaves in the I/O;
#   net  00:07.0 under serve net (--irq msix) bridged to vtap0 in namespace A, the kernel's
#        00:08.0 in namespace B, iperf3 with 4 streams A -> B run after run;
#   rng  00:04.0 under serve rng feeding the kernel pool, paused for bursts of 100 resets.
# Phases: a third of SOAK_MINUTES under load with no event (a long-lived driver must not grow),
# half with the events spread evenly (SOAK_UPGRADES hot upgrades alternating blk and net, cycling
# through live, reset and auto and the three builds: the installed release build R, this tree's
# debug build A and the variant build B without EVENT_IDX; SOAK_CRASHES kill -9 of the blk
# driver, recovered by systemd's restart from the descriptor store; SOAK_RESETS device resets on
# the rng), the rest under load again. The events phase runs until every event happened, however
# long that takes. Every SOAK_SAMPLE_SECONDS the drivers' RSS, descriptors and threads are read
# from /proc. At the end: every client's bytes and fio's verification, the file tree's
# checksums, fsck, no growth of the drivers (Tests/HIL/soak-report.py), and the report in
# $HIL_OUT/soak-report.md with the raw samples and events next to it.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk net net-peer rng
BLK=$(role blk) NET=$(role net) PEER=$(role net-peer) RNG=$(role rng)
unit=virtio-vfio-blk@$BLK.service
. Tests/HIL/systemd-lib.sh
MINUTES=${SOAK_MINUTES:-6} UPGRADES=${SOAK_UPGRADES:-6} CRASHES=${SOAK_CRASHES:-3} RESETS=${SOAK_RESETS:-100}
CLIENTS=${SOAK_CLIENTS:-32} SAMPLE=${SOAK_SAMPLE_SECONDS:-10}
out=${HIL_OUT:-/tmp}
systemd_begin
mnt=$work/mnt stop=$work/stop; mkdir -p "$mnt"
sock=/run/virtio-vfio/$BLK.nbd
dmesg -n 1
# The builds by the paths /proc/PID/exe shows (.build/debug is a symbolic link).
R=$prefix/bin/virtio-vfio A=$(readlink -f .build/debug/virtio-vfio) B=$(readlink -f .build-variant/debug/virtio-vfio)
[[ -x $A && -x $B ]] || { fail "the debug build .build/debug/virtio-vfio and the variant build .build-variant/debug/virtio-vfio are needed (tools/soak builds them)"; finish; }

# ---- blk: the unit, ext4 on the kernel client, our own clients -------------------------------------
install_unit blk "Environment=\"VIRTIO_VFIO_ARGS=--nbd unix:$sock --max-clients 64\""
check "systemctl start $unit" timeout 120 systemctl start "$unit"
[[ $(systemctl is-active "$unit") == active ]] || { fail "$unit: $(systemctl status "$unit" --no-pager 2>&1 | tail -n 5)"; finish; }
check "nbd-client attaches /dev/nbd0 with -t 3" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" -t 3
python3 Tests/HIL/nbd-reconnect.py "$sock" 0 --dead-conn-timeout 60 >"$work/reconnect.log" 2>&1 &
helper=$!
for _ in $(seq 1800); do grep -qs armed "$work/reconnect.log" && break; sleep 0.1; done
grep -q armed "$work/reconnect.log" && pass "reconnect helper armed" || { fail "reconnect helper: $(cat "$work/reconnect.log")"; finish; }
check "mkfs.ext4 on the first 128 MiB" timeout 60 mkfs.ext4 -q -F /dev/nbd0 128M
check "mount" timeout 30 mount /dev/nbd0 "$mnt"
mkdir -p "$mnt/tree"
for i in $(seq 1 20); do head -c $((RANDOM * 4 + i)) /dev/urandom >"$mnt/tree/file$i"; done
(cd "$mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/sums"
check "sync" timeout 60 sync

# ---- net: serve net, the namespaces, the iperf3 server ----------------------------------------------
peer=$(net_if $PEER)
check "bind $NET to vfio-pci" sh -c "vfio-bind bind $NET >/dev/null"
"$R" serve net $NET --tap vtap0 --irq msix 2>"$work/net.log" &
echo $! >"$work/pid.net"
for _ in $(seq 100); do ip link show vtap0 >/dev/null 2>&1 && break; sleep 0.1; done
ip netns add A && ip netns add B \
  && ip link set vtap0 netns A && ip -n A addr add 10.0.0.1/24 dev vtap0 && ip -n A link set vtap0 up && ip -n A link set lo up \
  && ip link set "$peer" netns B && ip -n B addr add 10.0.0.2/24 dev "$peer" && ip -n B link set "$peer" up && ip -n B link set lo up \
  && pass "vtap0 (serve net) in namespace A, $peer (virtio_net) in B" || fail "namespaces: $(tail -n 5 "$work/net.log")"
for _ in 1 2 3 4 5; do ip netns exec A timeout 10 ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1 && break; sleep 0.5; done
check "ping A -> B" sh -c "ip netns exec A timeout 10 ping -c 2 -W 2 10.0.0.2 >/dev/null"
# (ip netns exec makes a mount namespace, a copy of the mounts of the moment: the iperf3 server
# there holds the ext4 mount until it ends, so it is stopped before the filesystem is checked.)
ip netns exec B iperf3 -s -D --pidfile "$work/iperf3.pid" && sleep 0.5

# ---- rng ---------------------------------------------------------------------------------------------
check "bind $RNG to vfio-pci" sh -c "vfio-bind bind $RNG >/dev/null"
rng_start() { "$R" serve rng $RNG --rate 65536 2>>"$work/rng.log" & echo $! >"$work/pid.rng"; }
rng_stop() { local p; p=$(cat "$work/pid.rng"); kill -TERM "$p"; timeout 30 tail --pid="$p" -f /dev/null; }
rng_start

# ---- load ----------------------------------------------------------------------------------------
python3 Tests/HIL/nbd-clients.py "$sock" "$CLIENTS" 864000 1024 --base-mib 128 --reconnect --stop-file "$stop" \
  >"$work/clients.out" 2>&1 &
clients=$!
fio_loop() {
  local n=0
  while [[ ! -e $stop ]]; do
    n=$((n + 1))
    timeout 900 fio --name=soak --filename="$mnt/fio.dat" --size=32M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
      --iodepth=8 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --time_based --runtime=30 \
      --output-format=json --output="$work/fio-$n.json" >/dev/null 2>&1
    echo "$n $?" >>"$work/fio.runs"
  done
}
fio_loop &
fios=$!
iperf_loop() {
  local n=0
  while [[ ! -e $stop ]]; do
    n=$((n + 1))
    timeout 200 ip netns exec A iperf3 -c 10.0.0.2 -P 4 -t 30 -J >"$work/iperf-$n.json" 2>&1
    echo "$n $?" >>"$work/iperf.runs"
  done
}
iperf_loop &
iperfs=$!
python3 Tests/HIL/gap-probe.py /dev/nbd0 "$work/gaps" &
probe=$!
t_start=$(date +%s)
echo steady >"$work/phase"
# The sampler: one row per driver every SAMPLE seconds (pid files follow upgrades and restarts).
echo "seconds,phase,driver,pid,exe,rss_kib,fds,threads" >"$work/samples.csv"
sample_one() {
  local kind=$1 p=$2
  [[ -n $p && $p != 0 && -r /proc/$p/status ]] || return 0
  # Builtins where they do (a guest under this load starts processes slowly).
  local rss="" thr="" k v fd exe
  while read -r k v _; do case $k in VmRSS:) rss=$v ;; Threads:) thr=$v ;; esac; done <"/proc/$p/status" 2>/dev/null
  fd=("/proc/$p/fd/"*); exe=$(readlink "/proc/$p/exe")
  [[ -n $rss && -n $thr && -n $exe ]] && echo "$(($(printf '%(%s)T') - t_start)),$(<"$work/phase"),$kind,$p,$exe,$rss,${#fd[@]},$thr" >>"$work/samples.csv"
}
sampler() {
  while [[ ! -e $stop ]]; do
    sample_one blk "$(mainpid)"; sample_one net "$(<"$work/pid.net")"; sample_one rng "$(<"$work/pid.rng")"
    sleep "$SAMPLE"
  done
}
sampler &
sampler_pid=$!

# ---- events ----------------------------------------------------------------------------------------
total=$((MINUTES * 60)) steady=$((MINUTES * 20)) events_for=$((MINUTES * 30))
echo "seconds,kind,target,from,to,requested,effective,result,client_gap_ms,driver_gap_ms" >"$work/events.csv"
event() { echo "$(($(date +%s) - t_start)),$*" >>"$work/events.csv"; }
# window: closes the gap reader's window (the gap since the last call) and prints its longest gap in ms.
window() {
  local n; n=$(grep -c gap-ms "$work/gaps" 2>/dev/null); kill -USR1 $probe
  for _ in $(seq 300); do (($(grep -c gap-ms "$work/gaps") > n)) && break; sleep 0.1; done
  grep gap-ms "$work/gaps" | tail -n 1 | awk '{ print $2 }'
}
build_of() { case $1 in "$R") echo R ;; "$A") echo A ;; "$B") echo B ;; *) echo "?" ;; esac; }
group_of() { [[ $1 == B ]] && echo noidx || echo idx; }
path_of() { case $1 in R) echo "$R" ;; A) echo "$A" ;; B) echo "$B" ;; esac; }
declare -A build=([blk]=R [net]=R) step=([blk]=0 [net]=0)
modes=(live reset auto) builds=(R A B)
# upgrade TARGET: the next of the cycle (live to the other build of the same feature set, reset and
# auto to each build in turn) for blk or net, its outcome and gaps as an events row.
upgrade() {
  local target=$1 address from to mode k=${step[$1]} expected out rc pid line gap client=""
  step[$target]=$((k + 1))
  from=${build[$target]} mode=${modes[k % 3]}
  case $mode in
    live) if [[ $from == B ]]; then to=B; elif [[ $from == R ]]; then to=A; else to=R; fi ;;
    reset) to=${builds[(k / 3) % 3]} ;;
    auto) to=${builds[(k / 3 + 1) % 3]} ;;
  esac
  expected=$mode
  [[ $mode == auto ]] && { [[ $(group_of "$from") == $(group_of "$to") ]] && expected=live || expected=reset; }
  [[ $target == blk ]] && address=$BLK || address=$NET
  # The successor logs where its predecessor logs: the unit's journal (as the first driver's
  # stream, so not under its own _PID) or net.log.
  takeovers() { if [[ $target == blk ]]; then journalctl -b --no-pager -u "$unit" 2>/dev/null; else cat "$work/net.log"; fi \
    | grep -o "took over.*service gap [0-9.]* ms"; }
  local before; before=$(takeovers | wc -l)
  [[ $target == blk ]] && window >/dev/null
  out=$(timeout 120 "$A" upgrade $address --binary "$(path_of "$to")" --mode "$mode" 2>>"$work/upgrade.log"); rc=$?
  [[ $target == blk ]] && client=$(window)
  pid=$(sed -nE 's/^after: pid ([0-9]+).*/\1/p' <<<"$out")
  [[ $target == net && -n $pid ]] && echo "$pid" >"$work/pid.net"
  for _ in $(seq 50); do (($(takeovers | wc -l) > before)) && break; sleep 0.1; done
  line=$(takeovers | tail -n 1)
  (($(takeovers | wc -l) > before)) || line=""
  gap=$(grep -oE 'service gap [0-9.]+' <<<"$line" | awk '{ print $3 }')
  effective=$(grep -oE ' in (live|reset) mode' <<<"$line" | awk '{ print $2 }')
  if [[ $rc == 0 && $out == *"upgraded: "* && $effective == "$expected" ]]; then
    build[$target]=$to; event "upgrade,$target,$from,$to,$mode,$effective,ok,$client,$gap"
  else
    event "upgrade,$target,$from,$to,$mode,$effective,failed,$client,$gap"
    fail "upgrade $target $from -> $to ($mode, expected $expected): exit $rc, effective '$effective': $out $(tail -n 3 "$work/upgrade.log")"
    [[ $out == *"upgraded: "* ]] && build[$target]=$to
  fi
}
reconnects() { grep -c "reconnected" "$work/reconnect.log"; }
# crash: kill -9 of the blk driver, the restart (from the descriptor store) and the kernel client's reconnect.
crash() {
  local victim before t0 now ms line client
  victim=$(mainpid) before=$(reconnects)
  window >/dev/null
  t0=$(date +%s%N)
  kill -9 "$victim"
  if now=$(wait_active "$victim"); then
    ms=$((($(date +%s%N) - t0) / 1000000))
    for _ in $(seq 300); do (($(reconnects) > before)) && break; sleep 0.1; done
    sleep 1
    client=$(window)
    line=$(journalctl -b --no-pager -u "$unit" _PID="$now" | grep -o "restarted with the descriptors the service manager kept: .*")
    local how=reset; [[ $line == *"adopted"* ]] && how=adopted
    event "crash,blk,${build[blk]},R,kill-9,$how,ok,$client,$ms"
  else
    event "crash,blk,${build[blk]},R,kill-9,,failed,,"
    fail "crash: the driver did not come back: $(systemctl is-active "$unit"), main pid $now"
  fi
  build[blk]=R
}
# resets N: the rng's feed paused, N reset + renegotiate cycles, the feed again.
resets() {
  local n=$1 t0 out ms
  rng_stop
  t0=$(date +%s%N)
  out=$(timeout 600 "$A" reset $RNG --cycles "$n" --quiet 2>&1)
  ms=$((($(date +%s%N) - t0) / 1000000))
  if [[ $out == *"$n cycles ok"* ]]; then event "resets,rng,,,$n,,ok,,$ms"; else
    event "resets,rng,,,$n,,failed,,$ms"; fail "$n resets of the rng: $out"; fi
  rng_start
}

# fds PHASE: what each driver holds, for the report's reader (a growth shows here by name).
fds() {
  local kind p
  for kind in blk net rng; do
    [[ $kind == blk ]] && p=$(mainpid) || p=$(cat "$work/pid.$kind")
    ls -l "/proc/$p/fd" 2>/dev/null | awk 'NR > 1 { print $NF }' | sed -E 's/[0-9]+/N/g' | sort | uniq -c >"$out/fds-$1-$kind.txt"
  done
}
sleep "$steady"
fds steady
echo events >"$work/phase"
bursts=$(((RESETS + 99) / 100))
events=$((UPGRADES + CRASHES + bursts))
done_u=0 done_c=0 done_r=0 left_resets=$RESETS
for ((j = 0; j < events; j++)); do
  # The next event is the kind furthest behind its even share (Bresenham-like interleaving).
  du=$((UPGRADES * (j + 1) - done_u * events)) dc=$((CRASHES * (j + 1) - done_c * events)) dr=$((bursts * (j + 1) - done_r * events))
  due=$((t_start + steady + events_for * j / events))
  now=$(date +%s); ((due > now)) && sleep $((due - now))
  if ((du >= dc && du >= dr && done_u < UPGRADES)); then
    if ((done_u % 2 == 0)); then upgrade blk; else upgrade net; fi
    done_u=$((done_u + 1))
  elif ((dc >= dr && done_c < CRASHES)); then
    crash; done_c=$((done_c + 1))
  elif ((done_r < bursts)); then
    n=$((left_resets < 100 ? left_resets : 100)); resets "$n"; left_resets=$((left_resets - n)); done_r=$((done_r + 1))
  elif ((done_u < UPGRADES)); then
    if ((done_u % 2 == 0)); then upgrade blk; else upgrade net; fi
    done_u=$((done_u + 1))
  else
    crash; done_c=$((done_c + 1))
  fi
done
echo "  events done at $(($(date +%s) - t_start)) s: $done_u upgrades, $done_c crashes, $((RESETS - left_resets)) resets"
echo final >"$work/phase"
rest=$((t_start + total - $(date +%s)))
((rest < MINUTES * 10)) && rest=$((MINUTES * 10))
sleep "$rest"
fds final

# ---- the end: stop the load, check every byte ------------------------------------------------------------
touch "$stop"
elapsed=$(($(date +%s) - t_start))
timeout 300 tail --pid=$clients -f /dev/null; wait $clients; crc=$?
cl=$(tail -n 1 "$work/clients.out")
[[ $crc == 0 && $cl == "clients $CLIENTS served $CLIENTS refused 0 "*" wrong 0 errors 0 "* ]] \
  && pass "$CLIENTS NBD clients of our own: $cl" || fail "our clients: exit $crc: $(tail -n 5 "$work/clients.out")"
timeout 900 tail --pid=$fios -f /dev/null; timeout 300 tail --pid=$iperfs -f /dev/null
wait $sampler_pid
fio_bad=$(awk '$2 != 0' "$work/fio.runs" | wc -l) fio_runs=$(wc -l <"$work/fio.runs")
((fio_bad == 0 && fio_runs > 0)) && pass "fio on ext4: $fio_runs runs with crc32c verification, none failed" \
  || fail "fio: $fio_bad of $fio_runs runs failed: $(awk '$2 != 0' "$work/fio.runs" | head -n 3)"
iperf_bad=$(awk '$2 != 0' "$work/iperf.runs" | wc -l) iperf_runs=$(wc -l <"$work/iperf.runs")
((iperf_bad == 0 && iperf_runs > 0)) && pass "iperf3 A -> B, 4 streams: $iperf_runs runs, none failed" \
  || fail "iperf3: $iperf_bad of $iperf_runs runs failed: $(for n in $(awk '$2 != 0 { print $1 }' "$work/iperf.runs" | head -n 3); do jq -r '.error // empty' "$work/iperf-$n.json" 2>/dev/null; done)"
kill -TERM $probe 2>/dev/null; wait $probe 2>/dev/null
rng_stop
ip netns exec B kill "$(cat "$work/iperf3.pid")" 2>/dev/null
netpid=$(cat "$work/pid.net"); kill -TERM "$netpid"; timeout 30 tail --pid="$netpid" -f /dev/null
ip netns del A; ip netns del B
fed=$(grep -oE 'fed [0-9]+ bytes' "$work/rng.log" | awk '{ s += $2 } END { printf "%.0f\n", s }')
((fed > 0)) && pass "serve rng fed $fed bytes to the kernel pool over $(grep -c 'fed ' "$work/rng.log") runs" || fail "rng: $(tail -n 3 "$work/rng.log")"
(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "the file tree's checksums match" || fail "checksums differ"
check "umount" timeout 60 umount "$mnt"
held=$(grep -ls '^/dev/nbd0 ' /proc/[0-9]*/mounts | head -n 3)
[[ -z $held ]] && pass "no mount namespace holds /dev/nbd0 any more" || fail "/dev/nbd0 is still mounted for $held"
check "fsck.ext4 -f -n is clean" timeout 300 fsck.ext4 -f -n /dev/nbd0
check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
kill -TERM $helper 2>/dev/null; wait $helper 2>/dev/null
check "systemctl stop $unit" timeout 120 systemctl stop "$unit"
check "restore $NET" vfio-bind restore $NET >/dev/null
check "restore $RNG" vfio-bind restore $RNG >/dev/null

# ---- the report ----------------------------------------------------------------------------------------
for n in $(awk '$2 == 0 { print $1 }' "$work/iperf.runs"); do jq -r '.end.sum_received.bytes' "$work/iperf-$n.json"; done \
  | awk '{ s += $1 } END { printf "%.0f\n", s }' >"$work/iperf-bytes"
cp "$work/samples.csv" "$work/events.csv" "$out/" 2>/dev/null
# The report's other inputs too, so that a report that fails can be made again from them.
mkdir -p "$out/raw" && cp "$work/clients.out" "$work/iperf-bytes" "$work"/fio-*.json "$out/raw/" 2>/dev/null
# The blk unit's journal with monotonic times: where each restart spent its time.
journalctl -b --no-pager -u "$unit" -o short-monotonic >"$out/blk-journal.txt" 2>/dev/null
report=$(python3 Tests/HIL/soak-report.py --minutes "$MINUTES" --elapsed "$elapsed" --clients "$work/clients.out" \
  --fio "$work"/fio-*.json --fio-runs "$fio_runs" --iperf-bytes "$(cat "$work/iperf-bytes")" --iperf-runs "$iperf_runs" \
  --rng-bytes "$fed" --samples "$work/samples.csv" --events "$work/events.csv" --builds "R=$R" "A=$A" "B=$B"); rrc=$?
printf '%s\n' "$report" | tee "$out/soak-report.md"
[[ $rrc == 0 ]] && pass "the report: every event succeeded, no driver grew" || fail "the report found a problem (above)"
rm -rf "$work"
hil_summary soak
