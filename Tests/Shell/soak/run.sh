#!/usr/bin/env bash
# Tests of Tests/HIL/soak-report.py, the soak's judge, on made-up runs: a clean run passes; a
# descriptor leak, a thread leak, RSS growth past 10 % + 4 MiB, a failed event, a wrong byte and a
# client that was not served each fail it, naming the cause.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
P=0 F=0
ok() { P=$((P + 1)); echo "ok   $*"; }
bad() { F=$((F + 1)); echo "FAIL $*"; }
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT

# samples DRIVER FDS_END THREADS_END RSS_END: 8 steady samples of one pid, then 8 of a second
# process of the same build; the last three carry the given values.
samples() {
  echo "seconds,phase,driver,pid,exe,rss_kib,fds,threads" >"$t/samples.csv"
  local i
  for i in $(seq 0 7); do echo "$((i * 10)),steady,blk,100,/b/R,20000,40,3" >>"$t/samples.csv"; done
  for i in $(seq 8 12); do echo "$((i * 10)),events,blk,200,/b/R,20100,40,3" >>"$t/samples.csv"; done
  for i in $(seq 13 15); do echo "$((i * 10)),final,blk,200,/b/R,$3,$1,$2" >>"$t/samples.csv"; done
}
events() {
  cat >"$t/events.csv" <<CSV
seconds,kind,target,from,to,requested,effective,result,client_gap_ms,driver_gap_ms
30,upgrade,blk,R,A,live,live,ok,120.5,80.1
40,upgrade,net,R,A,live,live,ok,,30.2
50,crash,blk,A,R,kill-9,adopted,ok,3100,1500
60,resets,rng,,,100,,$1,,9000
CSV
}
clients() { echo "clients 32 served $1 refused 0 requests 1000 verified-bytes 2048000 wrong $2 errors 0 reconnects 3" >"$t/clients.out"; }
# fio's JSON, once with a note printed before it (fio does that).
echo '{"jobs": [{"write": {"io_bytes": 1048576}, "read": {"io_bytes": 1048576}}]}' >"$t/fio-1.json"
{ echo "note: both iodepth >= 1 and synchronous I/O engine are selected"; cat "$t/fio-1.json"; } >"$t/fio-2.json"
report() {
  OUT=$(python3 "$REPO/Tests/HIL/soak-report.py" --minutes 6 --elapsed 400 --clients "$t/clients.out" --fio "$t/fio-1.json" "$t/fio-2.json" \
    --fio-runs 5 --iperf-bytes 1000000 --iperf-runs 5 --rng-bytes 4096 --samples "$t/samples.csv" --events "$t/events.csv" \
    --builds R=/b/R); RC=$?
}
# expect WHAT RC NEEDLE
expect() {
  report
  [[ $RC == "$2" && $OUT == *"$3"* ]] && ok "$1" || bad "$1: exit $RC, '$3' not in: $(tail -n 5 <<<"$OUT")"
}

samples 40 3 21000; events ok; clients 32 0
expect "a clean run passes" 0 "No problem: every event succeeded"
expect "fio's totals are summed over its runs (notes before the JSON skipped)" 0 "5 runs; 2.0 MiB written, 2.0 MiB read back and verified"
echo '{"jobs": [{"write": {"io_bytes": 4096}, "read": {"io_bytes": 0}}]}' >"$t/fio-2.json"
cp "$t/fio-2.json" "$t/fio-3.json"; mv "$t/fio-1.json" "$t/fio-1.saved"; cp "$t/fio-3.json" "$t/fio-1.json"
expect "fio runs that verified nothing fail it" 1 "fio verified nothing in 2 runs"
mv "$t/fio-1.saved" "$t/fio-1.json"
echo "fio: error" >"$t/fio-2.json"
expect "fio output that is not JSON fails it" 1 "fio output fio-2.json"
{ echo "note"; cat "$t/fio-1.json"; } >"$t/fio-2.json"
report
grep -q '| blk upgrade, the driver.s service gap | 1 | 80.1 | 80.1 | 80.1 |' <<<"$OUT" && ok "the gap table has the upgrade's service gap" || bad "gap table: $OUT"
grep -q 'adopted x1' <<<"$OUT" && ok "the crash is counted as adopted" || bad "crash row: $OUT"
samples 41 3 21000; expect "one more descriptor at the end fails it" 1 "grew: fds 40 -> 41"
samples 40 4 21000; expect "one more thread fails it" 1 "grew: threads 3 -> 4"
samples 40 3 26100; expect "RSS past 10 % + 4 MiB fails it" 1 "grew: RSS 20000 -> 26100 KiB"
samples 40 3 26000; expect "RSS within 10 % + 4 MiB passes" 0 "No problem"
samples 40 3 21000; events failed; expect "a failed event fails it" 1 "resets at 60 s failed"
events ok; clients 32 1; expect "a wrong byte fails it" 1 "NBD clients: clients 32 served 32"
clients 31 0; expect "a client not served fails it" 1 "NBD clients: clients 32 served 31"
echo "soak-report: $P passed, $F failed"
((F == 0))
