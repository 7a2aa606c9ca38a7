#!/usr/bin/env bash
# HIL test of the systemd units under a real systemd (tools/hil/run --init systemd boots the guest
# with systemd as init): the units installed with tools/install (into a prefix on /run: the guest's
# root is the host's, read-only), then `serve rng` as virtio-vfio-rng@ADDRESS.service: started
# (systemctl returns once the driver said READY; its STATUS shown), reloaded twice (a hot upgrade
# started by the serving driver inside the service: the main pid moves to the new driver, the
# service stays active, the new driver logs to the service's journal), killed with SIGKILL
# (Restart=on-failure: the next driver gets the device back from the descriptor store and adopts
# it without a reset; the device stays on vfio-pci),
# stopped (the device back on virtio-pci). Every command is bounded by `timeout`.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng
RNG=$(role rng)
unit=virtio-vfio-rng@$RNG.service
. Tests/HIL/systemd-lib.sh
systemd_begin
install_unit rng
[[ $(driver_of $RNG) == virtio-pci ]] && pass "$RNG starts on virtio-pci" || fail "driver of $RNG: $(driver_of $RNG)"

t0=$(date +%s%N)
check "systemctl start $unit (returns once the driver said READY)" timeout 120 systemctl start "$unit"
echo "  started in $((($(date +%s%N) - t0) / 1000000)) ms (bind, open, reset, negotiate, READY)"
[[ $(systemctl is-active "$unit") == active ]] && pass "the service is active" || { fail "not active: $(systemctl status "$unit" --no-pager 2>&1 | tail -n 5)"; finish; }
pid1=$(mainpid)
status=$(systemctl show -p StatusText --value "$unit")
[[ $status == "serving $RNG (driver "* ]] && pass "the driver's STATUS: $status (main pid $pid1)" || fail "StatusText '$status'"
[[ $(driver_of $RNG) == vfio-pci ]] && pass "ExecStartPre bound $RNG to vfio-pci" || fail "driver of $RNG: $(driver_of $RNG)"

previous=$pid1
for round in 1 2; do
  t0=$(date +%s%N)
  timeout 60 systemctl reload "$unit" >"$work/reload.log" 2>&1 && pass "reload $round (hot upgrade) returned in $((($(date +%s%N) - t0) / 1000000)) ms" \
    || fail "reload $round: $(cat "$work/reload.log"); jobs: $(systemctl list-jobs --no-pager 2>&1 | tr '\n' ' ')"
  now=$(wait_active "$previous") && pass "reload $round: still active, main pid $previous -> $now (the old driver handed MAINPID over)" \
    || fail "reload $round: $(systemctl is-active "$unit"), main pid $previous -> $now"
  previous=$now
done
n=$(journalctl -b --no-pager -u "$unit" | grep -c "took over from driver")
[[ $n == 2 ]] && pass "both new drivers logged their takeover to the service's journal: $(journalctl -b --no-pager -u "$unit" | grep -o 'took over from driver.*service gap [0-9.]* ms' | tail -n 1)" \
  || fail "$n takeover lines in the journal of $unit"
status=$(systemctl show -p StatusText --value "$unit")
[[ $status == "serving $RNG (driver "* ]] && pass "the new driver's STATUS: $status" || fail "StatusText after the reloads '$status'"

kill -9 "$previous"
now=$(wait_active "$previous") && pass "SIGKILL of pid $previous: restarted as pid $now (Restart=on-failure)" \
  || fail "after SIGKILL: $(systemctl is-active "$unit"), main pid $now"
line=$(journalctl -b --no-pager -u "$unit" _PID="$now" | grep -o "restarted with the descriptors the service manager kept: .*")
[[ $line == *"adopted the device as it ran (no reset)"* ]] \
  && pass "the restarted driver got the device back from the manager's descriptor store and adopted it: $line" \
  || fail "after the crash, pid $now said '$line'"
[[ $(driver_of $RNG) == vfio-pci ]] && pass "the device stayed on vfio-pci for the restart" || fail "driver after the crash: $(driver_of $RNG)"

check "systemctl stop $unit" timeout 120 systemctl stop "$unit"
[[ $(driver_of $RNG) == virtio-pci ]] && pass "ExecStopPost gave $RNG back to virtio-pci" || fail "driver after stop: $(driver_of $RNG)"
[[ $(systemctl is-active "$unit") == inactive ]] && pass "the service is inactive (not failed)" || fail "after stop: $(systemctl is-active "$unit")"
finish
