#!/usr/bin/env bash
# HIL test of serve net (issue 8, first part): 00:07.0 driven by virtio-vfio and bridged to the
# TAP vtap0 in network namespace A (10.0.0.1), the kernel-driven 00:08.0 in namespace B
# (10.0.0.2); the QEMU hub joins the two NICs. ping both ways, a flood ping with no loss, iperf3
# TCP both ways; then 00:07.0 goes back to virtio_net and the same iperf3 runs kernel to kernel
# for a baseline. Between the two, serve net is upgraded (live, reset, auto, a rollback) while
# iperf3 TCP runs both ways; the connection must survive and the gaps are reported per mode.
# Every command is bounded by `timeout`.
# Environment: NET_FLOOD_COUNT (default 10000), NET_IPERF_SECONDS (default 10), NET_SERVE_ARGS
# (extra serve net options, e.g. "--busy-poll 2000").
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles net net-peer
OURS=$(role net) PEER=$(role net-peer)
FLOOD=${NET_FLOOD_COUNT:-10000} SECONDS_IPERF=${NET_IPERF_SECONDS:-10}
work=$(mktemp -d)
dmesg -n 1

inA() { ip netns exec A "$@"; }
inB() { ip netns exec B "$@"; }
# cpu_ticks PID: user + system clock ticks the process used so far (/proc/PID/stat fields 14, 15).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null; }

# iperf_run NAME [-R]: 10 s of TCP from A to B (or B to A with -R); prints Mbit/s received, or
# nothing on failure (the JSON is kept in $work/NAME.json).
iperf_run() {
  local name=$1; shift
  timeout $((SECONDS_IPERF + 30)) ip netns exec A iperf3 -c 10.0.0.2 -t "$SECONDS_IPERF" -J "$@" >"$work/$name.json" 2>&1
  jq -r '.end.sum_received.bits_per_second / 1e6 | floor' "$work/$name.json" 2>/dev/null
}

peer=$(net_if $PEER)
[[ -n $peer ]] && pass "kernel interface of $PEER: $peer" || fail "no interface under $PEER"
ours_mac=$(cat /sys/bus/pci/devices/$OURS/virtio*/net/*/address 2>/dev/null)  # the device's MAC, as the kernel read it
check "bind $OURS to vfio-pci" vfio-bind bind $OURS >/dev/null
ip netns add A && ip netns add B && pass "namespaces A and B" || fail "ip netns add"

# ---- our driver -------------------------------------------------------------------------------
# shellcheck disable=SC2086 # NET_SERVE_ARGS is a list of options
serve_log=$work/serve.log
virtio-vfio serve net $OURS --tap vtap0 ${NET_SERVE_ARGS:-} 2>"$serve_log" &
serve=$!
for _ in $(seq 100); do ip link show vtap0 >/dev/null 2>&1 && break; sleep 0.1; done
ip link show vtap0 >/dev/null 2>&1 && pass "serve net created vtap0" || fail "no vtap0: $(cat "$work/serve.log")"
line=$(grep "bridged to TAP vtap0" "$work/serve.log")
[[ -n $line ]] && pass "serve net: $line" || fail "serve log: $(cat "$work/serve.log")"
mac=$(cat /sys/class/net/vtap0/address 2>/dev/null)
[[ -n $mac && $mac == "$ours_mac" ]] && pass "vtap0 has the device's MAC $mac" || fail "vtap0 MAC '$mac', the device's '$ours_mac'"
ip link set vtap0 netns A && ip -n A addr add 10.0.0.1/24 dev vtap0 && ip -n A link set vtap0 up && ip -n A link set lo up \
  && pass "vtap0 moved to namespace A as 10.0.0.1/24" || fail "vtap0 into A"
ip link set "$peer" netns B && ip -n B addr add 10.0.0.2/24 dev "$peer" && ip -n B link set "$peer" up && ip -n B link set lo up \
  && pass "$peer moved to namespace B as 10.0.0.2/24" || fail "$peer into B"

# The first ping also resolves ARP; allow a few tries while links settle.
ok=0
for _ in 1 2 3 4 5; do inA timeout 10 ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.5; done
((ok)) && pass "ping A -> B (through the TAP fd after the namespace move)" || fail "ping A -> B: $(inA ip neigh; tail -n 5 "$work/serve.log")"
out=$(inA timeout 30 ping -c 5 -i 0.2 -W 2 10.0.0.2 2>&1)
[[ $out == *" 0% packet loss"* ]] && pass "ping A -> B: $(grep -E 'rtt|round-trip' <<<"$out")" || fail "ping A -> B: $out"
out=$(inB timeout 30 ping -c 5 -i 0.2 -W 2 10.0.0.1 2>&1)
[[ $out == *" 0% packet loss"* ]] && pass "ping B -> A: $(grep -E 'rtt|round-trip' <<<"$out")" || fail "ping B -> A: $out"

start=$(date +%s.%N)
out=$(inA timeout 300 ping -f -c "$FLOOD" -W 2 10.0.0.2 2>&1)
took=$(echo "$(date +%s.%N) - $start" | bc)
summary=$(grep -E "packets transmitted" <<<"$out")
[[ $summary == "$FLOOD packets transmitted, $FLOOD received,"*" 0% packet loss"* ]] && pass "flood ping A -> B: $summary (${took}s)" || fail "flood ping: $out"
out=$(inB timeout 300 ping -f -c "$FLOOD" -W 2 10.0.0.1 2>&1)
summary=$(grep -E "packets transmitted" <<<"$out")
[[ $summary == "$FLOOD packets transmitted, $FLOOD received,"*" 0% packet loss"* ]] && pass "flood ping B -> A: $summary" || fail "flood ping B -> A: $out"

t0=$(cpu_ticks $serve); sleep 3; t1=$(cpu_ticks $serve)
poll_idle=$((t1 - t0))
kill -USR1 $serve; sleep 0.5
grep -q "counters" "$work/serve.log" && pass "SIGUSR1 prints the counters" || fail "no counters after SIGUSR1: $(cat "$work/serve.log")"

inB iperf3 -s -D --pidfile "$work/iperf3.pid" && sleep 0.5
ours_tx=$(iperf_run ours-tx)
[[ -n $ours_tx && $ours_tx != null && $ours_tx -gt 0 ]] && pass "iperf3 TCP A -> B through serve net: $ours_tx Mbit/s" || fail "iperf3 A -> B: $(tail -n 5 "$work/ours-tx.json")"
ours_rx=$(iperf_run ours-rx -R)
[[ -n $ours_rx && $ours_rx != null && $ours_rx -gt 0 ]] && pass "iperf3 TCP B -> A through serve net: $ours_rx Mbit/s" || fail "iperf3 B -> A: $(tail -n 5 "$work/ours-rx.json")"
retr=$(jq -r '.end.sum_sent.retransmits // 0' "$work/ours-tx.json" 2>/dev/null)
echo "iperf3 retransmits A -> B: $retr"

# ---- hot upgrade of serve net while TCP flows (issue 8) ------------------------------------------
# Two builds as in upgrade.sh: A (this one) and B (-DVIRTIO_VFIO_NO_EVENT_IDX: another version,
# no EVENT_IDX, so live mode between A and B is impossible and auto falls back to reset).
A=$PWD/.build/debug/virtio-vfio B=$PWD/.build-variant/debug/virtio-vfio
current=$serve
if [[ -x $B ]]; then
  va=$($A --version) vb=$($B --version)
  # upgrade_net BINARY MODE [EXTRA...]: output in $OUT, status in $RC; the serving pid follows.
  upgrade_net() {
    local bin=$1 mode=$2; shift 2
    OUT=$(timeout 90 $A upgrade $OURS --binary "$bin" --mode "$mode" -- "$@" 2>>"$work/upgrade.log"); RC=$?
    local pid; pid=$(sed -nE 's/^after: pid ([0-9]+).*/\1/p' <<<"$OUT")
    [[ -n $pid ]] && current=$pid
  }
  # probe_start / probe_gap: ping B -> A every 5 ms with timestamps around one upgrade; the
  # longest time between two replies is the gap a client saw, with the replies lost.
  probe_start() { ip netns exec B timeout 120 ping -D -n -i 0.005 -W 1 10.0.0.1 >"$work/probe.txt" 2>&1 & probe=$!; sleep 1; }
  probe_gap() {
    sleep 1; kill -INT $probe 2>/dev/null; wait $probe 2>/dev/null
    local gap lost
    gap=$(sed -nE 's/^\[([0-9.]+)\] [0-9]+ bytes from.*/\1/p' "$work/probe.txt" \
      | awk 'NR > 1 { d = ($1 - p) * 1000; if (d > m) m = d } { p = $1 } END { printf "%.0f", m }')
    lost=$(sed -nE 's/^([0-9]+) packets transmitted, ([0-9]+) received.*/\1 \2/p' "$work/probe.txt" | awk '{ print $1 - $2 }')
    echo "${gap:-?} ms longest gap between ping replies, ${lost:-?} of $(sed -nE 's/^([0-9]+) packets transmitted.*/\1/p' "$work/probe.txt") lost"
  }
  # The successors log where the driver they replace logs ($serve_log: serve.log, later msix.log).
  driver_gap() { grep -oE "took over TAP vtap0 from driver [^ ]+ in (live|reset) mode in [^;]+; service gap [0-9.]+ ms \([^)]*\)" "$serve_log" | tail -n 1; }

  timeout 120 ip netns exec A iperf3 -c 10.0.0.2 -t 30 -i 1 -J >"$work/upgrade-tx.json" 2>&1 &
  iperf=$!
  sleep 4
  probe_start; upgrade_net "$A" live; client=$(probe_gap)
  [[ $RC == 0 && $OUT == *"upgraded: $va -> $va"* ]] && pass "serve net: live upgrade $va -> $va during iperf3" || fail "live upgrade: exit $RC: $OUT $(tail -n 5 "$serve_log")"
  live_driver=$(driver_gap) live_client=$client
  [[ $live_driver == *"in live mode"* ]] && pass "live mode: $live_driver; client: $live_client" || fail "live takeover log: $(tail -n 5 "$serve_log")"
  sleep 2
  probe_start; upgrade_net "$B" reset; client=$(probe_gap)
  [[ $RC == 0 && $OUT == *"upgraded: $va -> $vb"* ]] && pass "serve net: reset upgrade $va -> $vb during iperf3" || fail "reset upgrade: exit $RC: $OUT $(tail -n 5 "$serve_log")"
  reset_driver=$(driver_gap) reset_client=$client
  [[ $reset_driver == *"in reset mode"* ]] && pass "reset mode: $reset_driver; client: $reset_client" || fail "reset takeover log: $(tail -n 5 "$serve_log")"
  sleep 2
  upgrade_net "$A" auto
  [[ $RC == 0 && $OUT == *"upgraded: $vb -> $va"* ]] && grep -q "live mode not possible" "$serve_log" \
    && pass "serve net: auto mode across feature sets falls back to reset ($vb -> $va)" || fail "auto upgrade: exit $RC: $OUT"
  sleep 2
  upgrade_net "$A" live --debug-fault first-request-fails
  [[ $RC == 1 && $OUT == *"rolled back"* ]] && pass "serve net: a successor failing its first check is rolled back" || fail "rollback: exit $RC: $OUT"
  grep -q "device reset and rebuilt after the failed upgrade" "$serve_log" && pass "the old driver reset and rebuilt the device it had handed over live" || fail "no rebuild after rollback: $(tail -n 5 "$serve_log")"
  wait $iperf; rc=$?
  secs=$(jq -r '.end.sum_received.seconds // 0 | floor' "$work/upgrade-tx.json" 2>/dev/null)
  err=$(jq -r '.error // empty' "$work/upgrade-tx.json" 2>/dev/null)
  tail3=$(jq -r '[.intervals[-3:][].sum.bytes] | min' "$work/upgrade-tx.json" 2>/dev/null)
  mbit=$(jq -r '.end.sum_received.bits_per_second / 1e6 | floor' "$work/upgrade-tx.json" 2>/dev/null)
  retr=$(jq -r '.end.sum_sent.retransmits // 0' "$work/upgrade-tx.json" 2>/dev/null)
  [[ $rc == 0 && -z $err && ${secs:-0} -ge 29 && ${tail3:-0} -gt 0 ]] \
    && pass "iperf3 TCP A -> B kept its connection through 3 upgrades and a rollback: 30 s, $mbit Mbit/s, $retr retransmits" \
    || fail "iperf3 across upgrades: exit $rc, error '$err', $secs s, last intervals min $tail3 bytes"
  echo "per-second bytes: $(jq -r '[.intervals[].sum.bytes] | map(tostring) | join(" ")' "$work/upgrade-tx.json" 2>/dev/null)"

  # The other direction: the device receives the bulk (B -> A), a live then a reset upgrade.
  timeout 90 ip netns exec A iperf3 -c 10.0.0.2 -t 16 -i 1 -R -J >"$work/upgrade-rx.json" 2>&1 &
  iperf=$!
  sleep 4
  probe_start; upgrade_net "$A" live; client=$(probe_gap)
  [[ $RC == 0 ]] && pass "serve net: live upgrade during iperf3 B -> A; client: $client; $(driver_gap | grep -oE 'service gap [0-9.]+ ms')" || fail "live upgrade (-R): exit $RC: $OUT"
  live_client_rx=$client
  sleep 2
  probe_start; upgrade_net "$B" reset; client=$(probe_gap)
  [[ $RC == 0 ]] && pass "serve net: reset upgrade during iperf3 B -> A; client: $client; $(driver_gap | grep -oE 'service gap [0-9.]+ ms')" || fail "reset upgrade (-R): exit $RC: $OUT"
  reset_client_rx=$client
  wait $iperf; rc=$?
  secs=$(jq -r '.end.sum_received.seconds // 0 | floor' "$work/upgrade-rx.json" 2>/dev/null)
  err=$(jq -r '.error // empty' "$work/upgrade-rx.json" 2>/dev/null)
  tail3=$(jq -r '[.intervals[-3:][].sum.bytes] | min' "$work/upgrade-rx.json" 2>/dev/null)
  [[ $rc == 0 && -z $err && ${secs:-0} -ge 15 && ${tail3:-0} -gt 0 ]] \
    && pass "iperf3 TCP B -> A kept its connection through 2 upgrades: $(jq -r '.end.sum_received.bits_per_second / 1e6 | floor' "$work/upgrade-rx.json") Mbit/s" \
    || fail "iperf3 -R across upgrades: exit $rc, error '$err', $secs s, last intervals min $tail3 bytes"
  printf 'hot upgrade gaps       driver-side (quiesce to confirm)   client-side (ping every 5 ms)\n'
  printf '  live,  A -> B load   %s\n' "$(grep -oE 'service gap [0-9.]+ ms' <<<"$live_driver") | $live_client"
  printf '  reset, A -> B load   %s\n' "$(grep -oE 'service gap [0-9.]+ ms' <<<"$reset_driver") | $reset_client"
  printf '  live,  B -> A load   %s\n' "$live_client_rx"
  printf '  reset, B -> A load   %s\n' "$reset_client_rx"

  out=$(timeout 20 virtio-vfio info $OURS 2>&1)
  rxp=$(sed -nE 's/^ +net_frames\{queue=0\} +([0-9]+)$/\1/p' <<<"$out")
  [[ $out == *"served by pid $current"* && ${rxp:-0} -ge $((2 * FLOOD)) ]] \
    && pass "info asks the serving driver: pid $current, frames received $rxp (counted across the upgrades)" || fail "info: $out"
else
  fail "variant build $B missing (tools/test builds it): no upgrade test"
fi

kill -TERM $current
for _ in $(seq 100); do kill -0 $current 2>/dev/null || break; sleep 0.1; done
rc=0
[[ $current == "$serve" ]] && { wait $serve; rc=$?; }
cat "$work/serve.log" "$work/upgrade.log" 2>/dev/null >"$work/all.log"
echo "--- serve net log (first driver, then the upgrades)"; cat "$work/all.log"; echo "---"
kill -0 $current 2>/dev/null && fail "serve net (pid $current) still running after SIGTERM" || pass "serve net stops on SIGTERM"
[[ $rc == 0 ]] || fail "serve net exit $rc"
grep -q "stopped; device reset" "$work/all.log" && pass "stop summary printed" || fail "no stop summary"
grep -q "malformed from device: 0 " "$work/all.log" && pass "no malformed frames from the device" || fail "malformed frames: $(grep malformed "$work/all.log")"
frames=$(sed -nE 's/^device->tap: ([0-9]+) frames.*/\1/p' "$work/all.log" | tail -n 1)
[[ ${frames:-0} -ge $((2 * FLOOD)) ]] && pass "device->tap counted $frames frames" || fail "device->tap frames '$frames'"
ip -n A link show vtap0 >/dev/null 2>&1 && fail "vtap0 still exists after serve net stopped" || pass "vtap0 is gone with serve net"

# ---- the same bridge sleeping on MSI-X interrupts ------------------------------------------------
serve_log=$work/msix.log
virtio-vfio serve net $OURS --tap vtap0 --irq msix 2>"$serve_log" &
current=$!
for _ in $(seq 100); do ip link show vtap0 >/dev/null 2>&1 && break; sleep 0.1; done
ip link set vtap0 netns A && ip -n A addr add 10.0.0.1/24 dev vtap0 && ip -n A link set vtap0 up \
  && pass "serve net --irq msix: vtap0 in namespace A ($(grep -oE 'msix mode' "$work/msix.log"))" || fail "msix: $(cat "$work/msix.log")"
ok=0
for _ in 1 2 3 4 5; do inA timeout 10 ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.5; done
((ok)) && pass "msix: ping A -> B" || fail "msix: ping A -> B: $(tail -n 5 "$work/msix.log")"
out=$(inB timeout 300 ping -f -c "$FLOOD" -W 2 10.0.0.1 2>&1)
summary=$(grep -E "packets transmitted" <<<"$out")
[[ $summary == "$FLOOD packets transmitted, $FLOOD received,"*" 0% packet loss"* ]] && pass "msix: flood ping B -> A: $summary" || fail "msix flood ping: $out"
msix_tx=$(iperf_run msix-tx)
[[ -n $msix_tx && $msix_tx != null && $msix_tx -gt 0 ]] && pass "msix: iperf3 TCP A -> B $msix_tx Mbit/s" || fail "msix iperf3: $(tail -n 5 "$work/msix-tx.json")"
msix_rx=$(iperf_run msix-rx -R)
[[ -n $msix_rx && $msix_rx != null && $msix_rx -gt 0 ]] && pass "msix: iperf3 TCP B -> A $msix_rx Mbit/s" || fail "msix iperf3 -R: $(tail -n 5 "$work/msix-rx.json")"
# What an idle bridge costs: CPU ticks (1/100 s) over 3 s with no traffic, MSI-X against polling.
t0=$(cpu_ticks $current); sleep 3; t1=$(cpu_ticks $current)
msix_idle=$((t1 - t0))
echo "idle CPU over 3 s: msix $msix_idle ticks, poll $poll_idle ticks (1 tick = 10 ms)"
if [[ ${poll_idle:-0} -ge 3 ]]; then
  [[ $msix_idle -lt $poll_idle ]] && pass "msix: an idle bridge sleeps ($msix_idle ticks in 3 s, polling $poll_idle)" || fail "msix idle CPU $msix_idle ticks, poll $poll_idle"
else
  echo "idle polling used only ${poll_idle:-?} ticks: too little to compare"
fi
if [[ -x $B ]]; then
  timeout 60 ip netns exec A iperf3 -c 10.0.0.2 -t 12 -i 1 -J >"$work/msix-upgrade.json" 2>&1 &
  iperf=$!
  sleep 4
  upgrade_net "$A" live
  [[ $RC == 0 ]] && grep -q "in live mode" <(driver_gap) && pass "msix: live upgrade during iperf3 (vectors kept): $(driver_gap | grep -oE 'service gap [0-9.]+ ms')" \
    || fail "msix live upgrade: exit $RC: $OUT $(tail -n 5 "$serve_log")"
  wait $iperf; rc=$?
  tail3=$(jq -r '[.intervals[-3:][].sum.bytes] | min' "$work/msix-upgrade.json" 2>/dev/null)
  [[ $rc == 0 && ${tail3:-0} -gt 0 ]] && pass "msix: iperf3 kept its connection through the upgrade" || fail "msix iperf3 across the upgrade: exit $rc"
fi
kill -TERM $current
for _ in $(seq 100); do kill -0 $current 2>/dev/null || break; sleep 0.1; done
kill -0 $current 2>/dev/null && fail "serve net --irq msix still running" || pass "serve net --irq msix stopped"
sleeps=$(cat "$work/msix.log" "$work/upgrade.log" | sed -nE 's/.*interrupts: ([0-9]+) sleeps, ([0-9]+) woken by the device.*/\1 \2/p' | tail -n 1)
[[ -n $sleeps && ${sleeps%% *} -gt 0 ]] && pass "msix: the bridge slept on interrupts (sleeps, device wake-ups: $sleeps)" || fail "msix: no interrupt sleeps counted: $(tail -n 6 "$work/msix.log")"

# ---- kernel to kernel baseline ----------------------------------------------------------------
check "restore $OURS to its kernel driver" vfio-bind restore $OURS >/dev/null
ours_if=
for _ in $(seq 50); do ours_if=$(net_if $OURS); [[ -n $ours_if ]] && break; sleep 0.1; done
ip link set "$ours_if" netns A && ip -n A addr add 10.0.0.1/24 dev "$ours_if" && ip -n A link set "$ours_if" up \
  && pass "kernel interface $ours_if of $OURS in namespace A" || fail "baseline interface '$ours_if'"
ok=0
for _ in 1 2 3 4 5; do inA timeout 10 ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.5; done
((ok)) && pass "kernel-to-kernel ping" || fail "kernel-to-kernel ping"
start=$(date +%s.%N)
out=$(inA timeout 300 ping -f -c "$FLOOD" -W 2 10.0.0.2 2>&1)
took=$(echo "$(date +%s.%N) - $start" | bc)
echo "kernel-to-kernel flood ping: $(grep -E 'packets transmitted' <<<"$out") (${took}s)"
kern_tx=$(iperf_run kernel-tx)
kern_rx=$(iperf_run kernel-rx -R)
[[ -n $kern_tx && $kern_tx != null && -n $kern_rx && $kern_rx != null ]] && pass "iperf3 kernel to kernel: A -> B $kern_tx Mbit/s, B -> A $kern_rx Mbit/s" \
  || fail "kernel iperf3: $(tail -n 5 "$work/kernel-tx.json")"
ratio() { [[ ${2:-0} -gt 0 ]] && echo "scale=2; $1 / $2" | bc || echo "n/a"; }
printf 'throughput (Mbit/s)   serve net (poll)   serve net (msix)   kernel   ratio poll   ratio msix\n'
printf '  A -> B (TCP)        %16s %18s %8s %12s %12s\n' "$ours_tx" "$msix_tx" "$kern_tx" "$(ratio "${ours_tx:-0}" "$kern_tx")" "$(ratio "${msix_tx:-0}" "$kern_tx")"
printf '  B -> A (TCP, -R)    %16s %18s %8s %12s %12s\n' "$ours_rx" "$msix_rx" "$kern_rx" "$(ratio "${ours_rx:-0}" "$kern_rx")" "$(ratio "${msix_rx:-0}" "$kern_rx")"

[[ -f $work/iperf3.pid ]] && kill "$(cat "$work/iperf3.pid")" 2>/dev/null
ip netns del A; ip netns del B
hil_summary net
