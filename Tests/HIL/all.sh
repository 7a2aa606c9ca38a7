#!/usr/bin/env bash
# Every HIL test script (or the ones named: all.sh SCRIPT...), in one guest boot. Each script's
# output is printed as it is written (a script that hangs shows where); the last line is
# "hil: N passed, N failed" over all of them.
set -uo pipefail
cd "$(dirname "$0")/../.."
total_p=0 total_f=0
scripts=("$@")
((${#scripts[@]})) || scripts=(Tests/HIL/foundation.sh Tests/HIL/permissions.sh Tests/HIL/rng.sh Tests/HIL/blk.sh Tests/HIL/nbd.sh Tests/HIL/upgrade.sh Tests/HIL/crash.sh Tests/HIL/upgrade-under-load.sh Tests/HIL/upgrade-gap.sh Tests/HIL/net.sh Tests/HIL/swift-hil-tests.sh Tests/Shell/vfio-bind/guest-e2e.sh)
# The log goes to /run where it can: under systemd as init, starting a unit runs tmpfiles, which
# empties /tmp.
log=$(mktemp -p /run 2>/dev/null || mktemp)
trap 'rm -f "$log"' EXIT
for t in "${scripts[@]}"; do
  echo "### $t"
  VFIO_BIND_E2E=1 "$t" </dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  line=$(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -n1)
  p=$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+'); f=$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+')
  if [[ -z $line ]]; then p=0 f=1; fi
  if [[ $rc != 0 && ${f:-0} == 0 ]]; then f=1; fi
  total_p=$((total_p + ${p:-0})); total_f=$((total_f + ${f:-0}))
done
echo "hil: $total_p passed, $total_f failed"
((total_f == 0))
