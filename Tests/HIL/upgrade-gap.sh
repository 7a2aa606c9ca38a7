#!/usr/bin/env bash
# Where a hot upgrade's service gap goes, per phase and mode, for one or more driver builds in the
# same guest boot (docs/PERFORMANCE.md, "hot upgrade, the gap clients see"). For each build: serve
# blk, nbd-client attached, a reader (gap-probe.py) doing 4 KiB O_DIRECT reads; GAP_ROUNDS live
# and GAP_ROUNDS reset upgrades onto the same binary; then the median of the driver-side gap and of
# each phase the successor reports, and the median of the longest gap the reader saw.
#   GAP_BUILDS="label=/path/to/virtio-vfio ..."  (default: debug=.build/debug/virtio-vfio, as CI builds)
#   GAP_ROUNDS=N                                 (default 5)
# Checks: every upgrade succeeds, the reader sees no error.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles blk
BLK=$(role blk)
ROUNDS=${GAP_ROUNDS:-5}
BUILDS=${GAP_BUILDS:-debug=$PWD/.build/debug/virtio-vfio}
work=$(mktemp -d)
vfio-bind bind $BLK >/dev/null && pass "bound blk" || fail "bind"
# median: reads numbers, prints the median with one decimal ("-" when none).
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", (NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2); else printf "-" }'; }
table=$work/table
for build in $BUILDS; do
  label=${build%%=*} bin=${build#*=}
  if [[ ! -x $bin ]]; then fail "$label: $bin is not an executable"; continue; fi
  log=$work/$label.log sock=$work/$label.sock
  $bin serve blk $BLK --nbd "unix:$sock" 2>>"$log" &
  for _ in $(seq 100); do [[ -S $sock && -S /run/virtio-vfio/$BLK.sock ]] && break; sleep 0.1; done
  check "$label: nbd-client attaches" timeout 20 nbd-client -unix "$sock" /dev/nbd0 -b 4096 -N ""
  : >"$work/gaps"
  Tests/HIL/gap-probe.py /dev/nbd0 "$work/gaps" &
  probe=$!
  for _ in $(seq 100); do grep -q ready "$work/gaps" 2>/dev/null && break; sleep 0.1; done
  for mode in live reset; do
    ok=0 errors=0
    : >"$work/client-$mode"
    for _ in $(seq "$ROUNDS"); do
      kill -USR1 $probe; sleep 0.3; : >"$work/gaps"
      out=$(timeout 60 $bin upgrade $BLK --binary "$bin" --mode $mode 2>>"$log") && ok=$((ok + 1)) || echo "$label $mode: $out"
      sleep 0.5; kill -USR1 $probe; sleep 0.3
      read -r gap e < <(sed -nE 's/^gap-ms ([0-9.]+) reads [0-9]+ errors ([0-9]+).*/\1 \2/p' "$work/gaps" | tail -n1)
      [[ -n ${gap:-} ]] && echo "$gap" >>"$work/client-$mode"
      errors=$((errors + ${e:-1}))
    done
    [[ $ok == "$ROUNDS" && $errors == 0 ]] && pass "$label: $ROUNDS $mode upgrades, the reader saw no error" \
      || fail "$label: $ok of $ROUNDS $mode upgrades, $errors reader errors"
    lines=$(grep -E "took over from driver .* in $mode mode with" "$log" | tail -n "$ROUNDS")
    row="$label $mode: driver gap $(grep -oE 'service gap [0-9.]+' <<<"$lines" | grep -oE '[0-9.]+' | median) ms"
    for phase in "quiesce\\+state" quiesce state verify adopt "reset\\+rebuild" nbd "first read" "first request"; do
      value=$(grep -oE "(\(|, )$phase [0-9.]+ ms" <<<"$lines" | grep -oE '[0-9.]+ ms' | grep -oE '[0-9.]+' | median)
      [[ $value != - ]] && row+=", ${phase//\\/} $value"
    done
    row+="; client gap $(median <"$work/client-$mode") ms"
    echo "$row" | tee -a "$table"
  done
  kill -TERM $probe; wait $probe 2>/dev/null
  check "$label: nbd-client disconnects" timeout 20 nbd-client -d /dev/nbd0
  pid=$(pgrep -f "serve blk $BLK" | tail -n1)
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
echo "--- gap per phase (medians of $ROUNDS; ms)"
cat "$table" 2>/dev/null
vfio-bind restore $BLK >/dev/null 2>&1
hil_summary upgrade-gap
