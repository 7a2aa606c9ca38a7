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
for s in prepare build unit shell cli bench fuzz asan variant hil hil612 systemd --no-deps --dry-run; do
  grep -qE "^ +$s( |$)" <<<"$OUT" || missing+=("$s")
done
((${#missing[@]} == 0)) && ok "--help lists every stage and option" || bad "--help does not list: ${missing[*]}"
[[ $OUT != *"==="* && -z $ERR ]] && ok "--help runs no stage" || bad "--help ran something: $OUT $ERR"

# expect_plan "ARGS" "STAGES": tools/test --dry-run ARGS prints "stages: STAGES" and exits 0.
expect_plan() {
  # shellcheck disable=SC2086 # ARGS is a list of words
  run "$REPO/tools/test" --dry-run $1
  [[ $RC == 0 && $OUT == "stages: $2" ]] && ok "tools/test ${1:-(no stage)} runs: $2" \
    || bad "tools/test --dry-run $1: exit $RC, '$OUT' (expected 'stages: $2') $ERR"
}
expect_plan "" "prepare build unit shell cli bench fuzz asan variant hil hil612 systemd"
expect_plan "unit" "prepare build unit"
expect_plan "--no-deps unit" "unit"
expect_plan "shell" "shell"
expect_plan "hil" "prepare build variant hil"
expect_plan "hil612 cli" "prepare build cli hil612"
expect_plan "systemd" "prepare build systemd"
expect_plan "--no-deps asan shell fuzz" "shell fuzz asan"
expect_plan "unit unit" "prepare build unit"

for args in "bogus" "unit bogus" "--frob" "UNIT"; do
  # shellcheck disable=SC2086 # a list of words
  run "$REPO/tools/test" $args
  word=${args##* }
  if [[ $word == -* ]]; then what="unknown option '$word'"; else what="unknown stage '$word'"; fi
  [[ $RC == 2 && $ERR == *"$what"* && $ERR == *"stages are: prepare build unit"* && -z $OUT ]] \
    && ok "tools/test $args is refused (exit 2, names it and the stages)" \
    || bad "tools/test $args: exit $RC, out '$OUT', err '$ERR'"
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
