#!/usr/bin/env bash
# Tests of tools/hil/junit.py (JUnit XML from the HIL suites' output), parsed back with Python's
# XML parser: every check is a case, failures carry the output around them, skips are skipped, a
# script that died without its FAIL lines still fails, repeated names stay separate cases, and
# tools/hil/run --junit refuses a directory that does not exist.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
P=0 F=0
ok() { P=$((P + 1)); echo "ok   $*"; }
bad() { F=$((F + 1)); echo "FAIL $*"; }
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
cat >"$t/log" <<'LOG'
hil: accelerator: TCG
### Tests/HIL/rng.sh
ok   bind rng
rngtest: FIPS 140-2 failures: 40
FAIL rngtest poll mode: 40 failures
  detail after the failure
skip rng on another device type: the device map has no blk role
ok   bind rng
rng: 2 passed, 1 failed, 1 skipped
### Tests/HIL/nbd.sh
ok   nbd-client attaches
Segmentation fault <&>
nbd: 1 passed, 2 failed
LOG
python3 "$REPO/tools/hil/junit.py" --out "$t/out.xml" "$t/log"; rc=$?
[[ $rc == 0 ]] && ok "junit.py writes the file" || bad "junit.py exit $rc"
report=$(python3 - "$t/out.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
print("root", root.tag, root.get("tests"), root.get("failures"), root.get("skipped"))
for s in root.findall("testsuite"):
    print("suite", s.get("name"), s.get("tests"), s.get("failures"), s.get("skipped"))
    for c in s.findall("testcase"):
        f = c.find("failure"); k = c.find("skipped")
        print("case", c.get("name"), "|", "failure" if f is not None else "skipped" if k is not None else "pass",
              "|", (f.text or "").replace("\n", "\\n") if f is not None else "")
PY
)
# (The parsed report is printed only when a check below fails: its lines hold the word FAIL.)
grep -qx "root testsuites 6 2 1" <<<"$report" && ok "6 cases, 2 failures, 1 skipped in all" || bad "totals"
grep -qx "suite Tests/HIL/rng.sh 4 1 1" <<<"$report" && ok "one suite per ### line (rng: 4 cases)" || bad "rng suite"
grep -q "^case rngtest poll mode: 40 failures | failure | rngtest: FIPS 140-2 failures: 40\\\\nFAIL rngtest poll mode: 40 failures\\\\n  detail after the failure" <<<"$report" \
  && ok "a failure carries the output before and after it" || bad "failure text"
grep -q "^case bind rng (#2) | pass" <<<"$report" && ok "a repeated check is its own case" || bad "repeats"
grep -q "^case rng on another device type: the device map has no blk role | skipped" <<<"$report" && ok "skip lines are skipped cases" || bad "skips"
grep -q "^case Tests/HIL/nbd.sh: the script's own result (1 passed, 2 failed) | failure | .*Segmentation fault <&>" <<<"$report" \
  && ok "a suite that says more failed than it printed gets a failing case with its last lines (escaped)" || bad "script result"
grep -q "hil: accelerator" <<<"$report" && bad "harness lines before the first suite became a case" || ok "harness lines before the first suite are no case"
printf 'swift build: error: something\n' >"$t/died"
python3 "$REPO/tools/hil/junit.py" --out "$t/died.xml" --suite build "$t/died"
grep -q '<testcase classname="build" name="build: the script.s own result (no summary line)"><failure' "$t/died.xml" \
  && ok "a log with no check and no summary is one failure" || bad "died log: $(cat "$t/died.xml")"
python3 "$REPO/tools/hil/junit.py" --out "$t/x.xml" "$t/missing" 2>/dev/null; rc=$?
[[ $rc == 1 ]] && ok "an unreadable log: exit 1" || bad "unreadable log: exit $rc"
out=$("$REPO/tools/hil/run" --junit /nonexistent/dir/x.xml -- true 2>&1); rc=$?
[[ $rc == 2 && $out == *"the directory of /nonexistent/dir/x.xml does not exist"* ]] && ok "tools/hil/run --junit into a missing directory: exit 2" \
  || bad "tools/hil/run --junit: exit $rc: $out"
((F == 0)) || echo "$report" | sed 's/^/  | /'
echo "junit: $P passed, $F failed"
((F == 0))
