#!/usr/bin/env bash
# Tests of the test tooling itself, cheap (no build, nothing run in Swift):
#  - tools/test: --help runs nothing and exits 0, a stage list is parsed (with and without what
#    the stages need, in the fixed order), an unknown stage or option is refused with exit 2;
#  - tools/swift-testing-results against event streams recorded from Swift 6.3.1 (samples/):
#    mixed.jsonl is `swift test --event-stream-version 0` over samples/SampleTests.swift.txt (pass,
#    two failed expectations, a parameterized test with one failing case, a disabled test, a known
#    issue, a thrown error, a free function); crash.jsonl is the same package with
#    samples/Crash.swift.txt, run with SAMPLE_CRASH=1 so the process dies inside crashes().
#
# Usage: Tests/Shell/test-tools/run.sh     prints "test-tools: N passed, N failed"; exit 1 on failure
set -uo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
SAMPLES=$HERE/samples
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
# run CMD...: OUT, ERR and RC of the command.
run() {
  local e
  e=$(mktemp)
  OUT=$("$@" 2>"$e"); RC=$?
  ERR=$(cat "$e"); rm -f "$e"
}

# ---------------------------------------------------------------- tools/test
run "$REPO/tools/test" --help
[[ $RC == 0 ]] && ok "tools/test --help exits 0" || bad "tools/test --help exited $RC: $ERR"
missing=()
for s in prepare build variant release unit shell cli bench fuzz asan hil612 noiommu hil matrix systemd soak --no-deps --serial --dry-run --junit; do
  grep -qE "^ +$s( |$)" <<<"$OUT" || missing+=("$s")
done
((${#missing[@]} == 0)) && ok "--help lists every stage and option" || bad "--help does not list: ${missing[*]}"
[[ $OUT != *"==="* && -z $ERR ]] && ok "--help runs no stage" || bad "--help ran something: $OUT $ERR"

# expect_plan "ARGS" "STAGES" ["LANES"]: tools/test --dry-run ARGS prints "stages: STAGES" (and,
# when two lanes would run, the line "lanes: GUEST | HOST") and exits 0.
expect_plan() {
  local want="stages: $2"
  [[ -n ${3:-} ]] && want+=$'\n'"$3"
  # shellcheck disable=SC2086 # ARGS is a list of words
  run "$REPO/tools/test" --dry-run $1
  [[ $RC == 0 && $OUT == "$want" ]] && ok "tools/test ${1:-(no stage)} runs: $2${3:+ ($3)}" \
    || bad "tools/test --dry-run $1: exit $RC, '$OUT' (expected '$want') $ERR"
}
expect_plan "" "prepare build variant release hil612 noiommu hil matrix systemd soak unit shell cli bench fuzz asan" \
  "lanes: hil612 noiommu hil matrix systemd soak | unit shell cli bench fuzz asan"
expect_plan "--serial" "prepare build variant release unit shell cli bench fuzz asan hil612 noiommu hil matrix systemd soak"
expect_plan "soak" "prepare build variant release soak"
expect_plan "unit" "prepare build unit"
expect_plan "--no-deps unit" "unit"
expect_plan "shell" "shell"
expect_plan "hil" "prepare build variant hil"
expect_plan "hil612 cli" "prepare build variant hil612 cli" "lanes: hil612 | cli"
expect_plan "--serial hil612 cli" "prepare build variant cli hil612"
expect_plan "systemd" "prepare build release systemd"
expect_plan "--no-deps asan shell fuzz" "shell fuzz asan"
expect_plan "unit unit" "prepare build unit"

for args in "bogus" "unit bogus" "--frob" "UNIT"; do
  # shellcheck disable=SC2086 # a list of words
  run "$REPO/tools/test" $args
  word=${args##* }
  if [[ $word == -* ]]; then what="unknown option '$word'"; else what="unknown stage '$word'"; fi
  [[ $RC == 2 && $ERR == *"$what"* && $ERR == *"stages are: prepare build variant release unit"* && -z $OUT ]] \
    && ok "tools/test $args is refused (exit 2, names it and the stages)" \
    || bad "tools/test $args: exit $RC, out '$OUT', err '$ERR'"
done

# ---------------------------------------------------------------- tools/test --junit
run "$REPO/tools/test" --junit /nonexistent/dir/r.xml --dry-run
[[ $RC == 2 && $ERR == *"--junit: the directory of /nonexistent/dir/r.xml does not exist"* ]] && ok "tools/test --junit into a missing directory: exit 2" \
  || bad "tools/test --junit /nonexistent: exit $RC: $ERR"
if [[ -x $REPO/.build/debug/virtio-vfio ]]; then
  j=$(mktemp -d)
  (cd "$j" && "$REPO/tools/test" --no-deps --junit r.xml cli >"$j/out" 2>&1); rc=$?
  summary=$(python3 - "$j/r.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = {s.get("name"): (len(s.findall("testcase")), s.get("failures")) for s in root.findall("testsuite")}
print(" ".join("%s=%d/%s" % (k, v[0], v[1]) for k, v in sorted(suites.items())))
PY
)
  counted=$(sed -nE 's/^total: ([0-9]+) passed, ([0-9]+) failed$/\1 \2/p' "$j/out" | awk '{ print $1 + $2 }')
  cases=$(grep -oE '=[0-9]+/' <<<"$summary" | tr -d '=/' | awk '{ s += $1 } END { print s + 0 }')
  [[ $rc == 0 && $summary == *"cli: Tests/Shell/cli/usage.sh="* && $summary == *"stages=1/0"* && $cases == $((counted + 1)) ]] \
    && ok "tools/test --junit r.xml cli (relative to where it was run): a suite per script, a case per check ($counted) and one for the stage" \
    || bad "tools/test --junit: exit $rc, suites '$summary', $cases cases for $counted checks: $(tail -n 3 "$j/out")"
  rm -rf "$j"
else
  echo "skip tools/test --junit cli: no debug build ($REPO/.build/debug/virtio-vfio)"
fi

# ---------------------------------------------------------------- tools/hil/host-run (usage; this kernel has no VFIO)
run "$REPO/tools/hil/host-run" --help
[[ $RC == 0 && $OUT == *"--map FILE"* && $OUT == *"--junit FILE"* ]] && ok "host-run --help names --map and --junit" || bad "host-run --help: exit $RC $ERR"
for args in "|--map FILE is required" "--map /nonexistent.map|cannot read the device map '/nonexistent.map'" \
            "--map $REPO/tools/hil/devices.map nosuch.sh|no suite 'nosuch.sh'" "--map $REPO/tools/hil/devices.map --frob|unknown option '--frob'"; do
  # shellcheck disable=SC2086 # a list of words
  run "$REPO/tools/hil/host-run" ${args%%|*}
  [[ $RC == 2 && $ERR == *"${args#*|}"* ]] && ok "host-run ${args%%|*}: exit 2, ${args#*|}" || bad "host-run ${args%%|*}: exit $RC: $ERR"
done
if [[ ! -e /dev/vfio/vfio ]]; then
  run "$REPO/tools/hil/host-run" --map "$REPO/tools/hil/devices.map" --junit /tmp/never.xml
  if ((EUID == 0)); then want="/dev/vfio/vfio is missing"; else want="run as root"; fi
  [[ $RC == 2 && $ERR == *"refusing: "*"$want"* && ! -e /tmp/never.xml ]] && ok "host-run on a machine without VFIO refuses before touching anything: $want" \
    || bad "host-run without VFIO: exit $RC: $ERR"
fi

# ---------------------------------------------------------------- tools/soak (usage only: no build, no guest)
run "$REPO/tools/soak" --help
[[ $RC == 0 && $OUT == *"--minutes N"* && $OUT == *"--short"* && -z $ERR ]] && ok "tools/soak --help exits 0 and names its options" \
  || bad "tools/soak --help: exit $RC, err '$ERR'"
for args in "--minutes x|--minutes wants a whole number" "--minutes 2|--minutes must be at least 3" "--clients 64|--clients must be 1-63" \
            "--frob|unknown argument '--frob'" "--out|--out needs a directory"; do
  # shellcheck disable=SC2086 # a list of words
  run "$REPO/tools/soak" ${args%%|*}
  [[ $RC == 2 && $ERR == *"${args#*|}"* && -z $OUT ]] && ok "tools/soak ${args%%|*} is refused (exit 2): ${args#*|}" \
    || bad "tools/soak ${args%%|*}: exit $RC, out '$OUT', err '$ERR'"
done

# ---------------------------------------------------------------- tools/swift-testing-results
run "$REPO/tools/swift-testing-results" --label sample "$SAMPLES/mixed.jsonl"
# 7 functions: passes, knownIssue and the free function pass; failsTwice, throwsError and
# parameterized (one of three cases) fail; skipped is neither.
[[ $RC == 1 && $(tail -n1 <<<"$OUT") == "sample: 3 passed, 3 failed, 1 skipped" ]] && ok "mixed run counted (3 pass, 3 fail, 1 skipped)" \
  || bad "mixed run: exit $RC, last line '$(tail -n1 <<<"$OUT")'"
fails=$(grep -E '^FAIL: ' <<<"$OUT" | sort | tr '\n' ';')
[[ $fails == "FAIL: failsTwice();FAIL: parameterized(_:);FAIL: throwsError();" ]] && ok "mixed run names the three failed tests" \
  || bad "mixed run failed tests: $fails"
[[ $OUT == *"SampleTests/SampleTests.swift:7: Expectation failed: (twice(3) → 6) == 7"* ]] && ok "each failure shows its issues" \
  || bad "issues not shown: $OUT"
[[ $OUT != *"knownIssue"* ]] && ok "a known issue is not a failure" || bad "known issue reported: $OUT"

run "$REPO/tools/swift-testing-results" "$SAMPLES/crash.jsonl"
[[ $RC == 1 && $(tail -n1 <<<"$OUT") == "swift test: 0 passed, 1 failed" ]] && ok "a run that died: the running test failed, once" \
  || bad "crash run: exit $RC, '$OUT'"
[[ $OUT == *"FAIL: crashes() (started, never ended"* && $OUT == *"did not finish"* ]] && ok "a run that died says where" \
  || bad "crash run output: $OUT"

# All passed: the mixed sample without the failing tests' issues and ends, as a passing run writes it.
work=$(mktemp -d)
grep -vE '"kind":"issueRecorded"' "$SAMPLES/mixed.jsonl" >"$work/passing.jsonl"
run "$REPO/tools/swift-testing-results" --label clean "$work/passing.jsonl"
[[ $RC == 0 && $(tail -n1 <<<"$OUT") == "clean: 6 passed, 0 failed, 1 skipped" ]] && ok "a clean run exits 0" \
  || bad "clean run: exit $RC, '$OUT'"
# Cut mid-line by a dying process: the partial last line is ignored, the rest counted.
head -c 9000 "$SAMPLES/mixed.jsonl" >"$work/cut.jsonl"
run "$REPO/tools/swift-testing-results" "$work/cut.jsonl"
[[ $RC == 1 && $OUT == *"did not finish"* && $OUT != *"not JSON"* ]] && ok "a stream cut mid-line is read up to the cut" \
  || bad "cut stream: exit $RC, '$OUT'"
: >"$work/empty.jsonl"
run "$REPO/tools/swift-testing-results" "$work/empty.jsonl"
[[ $RC == 2 && $ERR == *"holds no Swift Testing record"* ]] && ok "an empty stream is refused (exit 2)" || bad "empty stream: exit $RC, '$OUT' '$ERR'"
run "$REPO/tools/swift-testing-results" "$work/absent.jsonl"
[[ $RC == 2 && $ERR == *"cannot read"* ]] && ok "a missing stream is refused (exit 2)" || bad "missing stream: exit $RC, '$ERR'"
rm -rf "$work"

echo "test-tools: $passed passed, $failed failed"
((failed == 0))
