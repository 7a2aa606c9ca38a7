#!/usr/bin/env bash
# HIL test of `serve blk` as a systemd service, in a guest booted with systemd as init
# (tools/hil/run --init systemd): the units installed with tools/install (into a prefix on /run:
# the guest's root is the host's, read-only), the service started (READY from the driver),
# ext4 on the kernel NBD client, then under fio with crc32c verification: `systemctl reload` (a
# hot upgrade: the new driver becomes the main pid, the service stays active, no client error),
# SIGKILL of the driver twice (Restart=on-failure; the restarted driver gets the device's VFIO
# descriptors, DMA memory and NBD listener back from the manager's descriptor store and adopts
# the device as it ran, then, told --after-crash reset, resets it; each time the client
# reconnects through Tests/HIL/nbd-reconnect.py and a reader measures the gap), a driver that stops
# answering (SIGSTOP: the watchdog lapses, systemd kills and restarts it), fsck clean, and
# `systemctl stop` giving the device back to its kernel driver. Meanwhile the metrics endpoint
# (--metrics) is read with curl (values move under fio; the new driver reports its upgrade), the
# STATUS line carries the counters, and the journal has the driver's priorities. Every command
# is bounded.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
unit=virtio-vfio-blk@$BLK.service
. Tests/HIL/systemd-lib.sh
systemd_begin
mnt=$work/mnt; mkdir -p "$mnt"
sock=/run/virtio-vfio/$BLK.nbd
dmesg -n 1

# ---- install and start --------------------------------------------------------------------------
# The driver's options (on a real machine in /etc/virtio-vfio/ADDRESS.conf) add the metrics
# endpoint; a short watchdog makes the hung-driver test quick.
metrics=127.0.0.1:9464
install_unit blk "Environment=\"VIRTIO_VFIO_ARGS=--nbd unix:$sock --metrics $metrics\"" "WatchdogSec=6s"
# metric SERIES: its value in the exposition now (empty if absent or the endpoint does not answer).
metric() { timeout 10 curl -s --max-time 5 "http://$metrics/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
series() { printf 'virtio_vfio_%s{device="%s"%s}' "$1" "$BLK" "${2:+,$2}"; }
t0=$(date +%s%N)
check "systemctl start $unit (returns once the driver said READY)" timeout 120 systemctl start "$unit"
echo "  started in $((($(date +%s%N) - t0) / 1000000)) ms (bind, open, reset, negotiate, READY)"
state=$(systemctl is-active "$unit")
[[ $state == active ]] && pass "the service is active" || { fail "state $state: $(systemctl status "$unit" --no-pager 2>&1 | tail -n 5)"; finish; }
pid1=$(systemctl show -p MainPID --value "$unit")
status=$(systemctl show -p StatusText --value "$unit")
[[ $status == "serving $BLK (driver "* ]] && pass "the driver's STATUS: $status (main pid $pid1)" || fail "StatusText '$status'"
[[ $(driver_of $BLK) == vfio-pci ]] && pass "ExecStartPre bound $BLK to vfio-pci" || fail "driver of $BLK: $(driver_of $BLK)"
[[ $(systemctl show -p WatchdogUSec --value "$unit") == 6s ]] && pass "the service has a watchdog (6 s here)" || fail "WatchdogUSec $(systemctl show -p WatchdogUSec --value "$unit")"
v=$(metric "$(series driver_info 'version="'"$(virtio-vfio --version)"'"')")
[[ $v == 1* ]] && pass "curl reads the metrics endpoint at $metrics (driver_info 1)" || fail "metrics endpoint: '$(timeout 10 curl -s --max-time 5 "http://$metrics/metrics" | head -n 5)'"
prio=$(journalctl -b --no-pager -u "$unit" -o json | jq -r 'select(.MESSAGE | type == "string" and contains("exporting")) | .PRIORITY' | tail -n 1)
journalctl -b --no-pager -u "$unit" | grep -q '<[0-9]>' && fail "a '<N>' priority prefix reached the journal's text" \
  || { [[ $prio == 6 ]] && pass "the journal took the driver's priority (info, 6) from its line prefix" || fail "PRIORITY of the start line: '$prio'"; }

check "nbd-client attaches over netlink with -t 3" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N "" -t 3
python3 Tests/HIL/nbd-reconnect.py "$sock" 0 --dead-conn-timeout 60 >"$work/reconnect.log" 2>&1 &
helper=$!
for _ in $(seq 1800); do grep -qs armed "$work/reconnect.log" && break; sleep 0.1; done
grep -q armed "$work/reconnect.log" && pass "reconnect helper armed" || { fail "reconnect helper: $(cat "$work/reconnect.log")"; finish; }
check "mkfs.ext4" timeout 60 mkfs.ext4 -q -F /dev/nbd0
check "mount" timeout 30 mount /dev/nbd0 "$mnt"
mkdir -p "$mnt/tree"
for i in $(seq 1 20); do head -c $((RANDOM * 4 + i)) /dev/urandom >"$mnt/tree/file$i"; done
(cd "$mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/sums"
check "sync" timeout 60 sync

# ---- reload under fio -----------------------------------------------------------------------------
timeout 300 fio --name=svc --filename="$mnt/fio.dat" --size=16M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
  --iodepth=8 --verify=crc32c --verify_fatal=1 --verify_backlog=64 --time_based --runtime=20 --output-format=json \
  --output="$work/fio.json" >/dev/null 2>&1 &
fio=$!
sleep 4
writes=$(series blk_requests_total 'queue="0",op="write"')
w1=$(metric "$writes"); sleep 2; w2=$(metric "$writes")
c=$(metric "$(series blk_request_duration_seconds_count 'queue="0",op="write"')")
[[ -n $w1 && -n $w2 ]] && (( ${w2%.*} > ${w1%.*} && ${c%.*} > 0 )) \
  && pass "the metrics move under fio: writes $w1 -> $w2 in 2 s, $c write latencies in the histogram" || fail "writes '$w1' -> '$w2', histogram count '$c'"
status=$(systemctl show -p StatusText --value "$unit")
[[ $status == "serving $BLK (driver "*"): 1 NBD client, "*" writes, 0 errors, "* ]] && pass "STATUS carries the counters: $status" || fail "StatusText '$status'"
w3=$(timeout 20 "$prefix/bin/virtio-vfio" info "$BLK" --json | jq -r '.counters[]? | select(.name == "blk_requests{queue=0,op=write}") | .value')
[[ -n $w3 && -n $w2 ]] && (( w3 >= ${w2%.*} )) && pass "info --json has the same counters (blk_requests{queue=0,op=write} $w3)" || fail "info --json counters: '$w3'"
t0=$(date +%s%N)
timeout 120 systemctl reload "$unit" >"$work/reload.log" 2>&1 && pass "systemctl reload under fio (hot upgrade) in $((($(date +%s%N) - t0) / 1000000)) ms" \
  || fail "reload: $(cat "$work/reload.log")"
pid2=$(systemctl show -p MainPID --value "$unit")
state=$(systemctl is-active "$unit")
[[ $state == active && $pid2 != "$pid1" && $pid2 != 0 ]] && pass "still active, main pid $pid1 -> $pid2 (the old driver handed MAINPID over)" \
  || fail "after reload: state $state, main pid $pid1 -> $pid2"
journalctl -b --no-pager -u "$unit" | grep -q "took over from driver" && pass "the new driver logs to the service's journal: $(journalctl -b --no-pager -u "$unit" | grep -o 'took over from driver.*service gap [0-9.]* ms' | tail -n 1)" \
  || fail "no takeover line in the journal of $unit"
# The old driver's endpoint closes as it exits; then every scrape reaches the new one.
timeout 10 tail --pid="$pid1" -f /dev/null
up=$(metric "$(series upgrades_total 'mode="live"')"); gap=$(metric "$(series last_upgrade_gap_seconds)")
[[ $up == 1* && -n $gap ]] && pass "the new driver's metrics: upgrades_total{mode=live} $up, last_upgrade_gap_seconds $gap" || fail "after the reload: upgrades '$up', gap '$gap'"
if timeout 120 tail --pid=$fio -f /dev/null; wait $fio; then rc=0; else rc=$?; fi
# A time-based run verifies only with verify_backlog, and its reads are the verification (fio's
# JSON counts them; its text output does not show them).
read -r ferr fw fr < <(sed -n '/^{/,$p' "$work/fio.json" | jq -r '.jobs[0] | "\(.error) \(.write.io_bytes) \(.read.io_bytes)"' 2>/dev/null)
[[ $rc == 0 && $ferr == 0 && ${fr:-0} -gt 0 ]] \
  && pass "fio verified what it wrote through the reload (no client error): $((fw / 1024)) KiB written, $((fr / 1024)) KiB read back and checked" \
  || fail "fio exit $rc, error '$ferr', written '$fw', verified '$fr': $(head -c 300 "$work/fio.json")"

# ---- SIGKILL: restarted from the descriptor store, adopted (then reset), recovered -------------------
# crash PID WHAT EXPECT: SIGKILL of PID under fio and a one-at-a-time reader; the restarted
# driver must log EXPECT (how it brought the device up from the kept descriptors); sets $now
# to the new main pid and prints the longest time the reader waited (the client-side gap).
reconnects() { grep -c "reconnected" "$work/reconnect.log"; }
crash() {
  local victim=$1 what=$2 expect=$3 before rc gap
  before=$(reconnects)
  timeout 300 fio --name=crash --filename="$mnt/fio-$what.dat" --size=16M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$work/fio-$what.out" >/dev/null 2>&1 &
  local fio=$!
  : >"$work/gap-$what"
  python3 Tests/HIL/gap-probe.py /dev/nbd0 "$work/gap-$what" &
  local probe=$!
  for _ in $(seq 100); do grep -qs ready "$work/gap-$what" && break; sleep 0.1; done
  sleep 3
  kill -USR1 $probe  # the window starts at the crash
  kill -9 "$victim"
  now=$(wait_active "$victim") && pass "$what: SIGKILL of pid $victim: restarted as pid $now (Restart=on-failure)" \
    || fail "$what: after SIGKILL: $(systemctl is-active "$unit"), main pid $now"
  [[ $(driver_of $BLK) == vfio-pci ]] && pass "$what: the device stayed on vfio-pci for the restart" || fail "$what: driver after the crash: $(driver_of $BLK)"
  line=$(journalctl -b --no-pager -u "$unit" _PID="$now" | grep -o "restarted with the descriptors the service manager kept: .*")
  [[ $line == *"$expect"* ]] && pass "$what: $line" || fail "$what: expected '$expect' from pid $now: '$line'"
  journalctl -b --no-pager -u "$unit" _PID="$now" | grep -q "listening on the NBD socket the service manager kept" \
    && pass "$what: the NBD listener came back from the store (reconnecting clients waited in its backlog)" || fail "$what: the NBD listener was not kept"
  for _ in $(seq 300); do (( $(reconnects) > before )) && break; sleep 0.1; done
  (( $(reconnects) > before )) && pass "$what: the kernel NBD client reconnected" || fail "$what: no reconnect: $(tail -n 3 "$work/reconnect.log")"
  sleep 1
  kill -TERM $probe; wait $probe 2>/dev/null
  gap=$(grep -oE 'gap-ms [0-9.]+' "$work/gap-$what" | tail -n 1)
  errors=$(grep -oE 'errors [0-9]+' "$work/gap-$what" | awk '{ s += $2 } END { print s + 0 }')
  [[ -n $gap && $errors == 0 ]] && pass "$what: the reader saw no error; it waited at most ${gap#gap-ms } ms (client-side gap)" \
    || fail "$what: reader: $(cat "$work/gap-$what")"
  echo "  crash gap, $what: ${gap#gap-ms } ms"
  if timeout 300 tail --pid=$fio -f /dev/null; wait $fio; then rc=0; else rc=$?; fi
  [[ $rc == 0 ]] && grep -q "err= 0" "$work/fio-$what.out" && pass "$what: fio verified every block through the crash" \
    || fail "$what: fio exit $rc: $(grep -E 'err=|verify|error' "$work/fio-$what.out" | head -n 5)"
}
crash "$pid2" adopted "adopted the device as it ran (no reset)"
pid3=$now
# The same crash, the restart told to reset (--after-crash reset): the gap of the reset path.
sed -i "s|--metrics $metrics|--metrics $metrics --after-crash reset|" /run/systemd/system/virtio-vfio-blk@.service.d/hil.conf
check "daemon-reload with --after-crash reset" timeout 60 systemctl daemon-reload
crash "$pid3" reset "reset it (not adopted: asked to reset)"
pid3=$now

# ---- a driver that stops answering: the watchdog ------------------------------------------------------
kill -STOP "$pid3"
for _ in $(seq 300); do
  pid4=$(systemctl show -p MainPID --value "$unit")
  [[ $(systemctl is-active "$unit") == active && $pid4 != 0 && $pid4 != "$pid3" ]] && break
  sleep 0.1
done
journalctl -b --no-pager -u "$unit" | grep -q "Watchdog timeout" && [[ $pid4 != "$pid3" && $(systemctl is-active "$unit") == active ]] \
  && pass "SIGSTOP of pid $pid3: the watchdog lapsed, systemd restarted the driver as pid $pid4" \
  || fail "after SIGSTOP: $(systemctl is-active "$unit"), main pid $pid4, $(journalctl -b --no-pager -u "$unit" | grep -c 'Watchdog timeout') watchdog lines"
check "a read through the restarted driver" timeout 120 dd if=/dev/nbd0 of=/dev/null bs=64k count=64 iflag=direct status=none
(cd "$mnt" && timeout 120 sha256sum --quiet -c "$work/sums") && pass "the file tree's checksums match" || fail "checksums differ"
check "umount" timeout 60 umount "$mnt"
check "fsck.ext4 -f -n is clean" timeout 120 fsck.ext4 -f -n /dev/nbd0
check "nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
kill -TERM $helper 2>/dev/null; wait $helper 2>/dev/null

# ---- stop: the device goes back ----------------------------------------------------------------------
check "systemctl stop $unit" timeout 120 systemctl stop "$unit"
[[ $(driver_of $BLK) == virtio-pci ]] && pass "ExecStopPost gave $BLK back to virtio-pci" || fail "driver after stop: $(driver_of $BLK)"
finish 40
