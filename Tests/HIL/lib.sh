# Helpers for HIL test scripts (run inside the guest by tools/hil/run). Each check prints one
# line; hil_summary prints "N passed, N failed" and returns non-zero if anything failed.
HIL_PASSED=0
HIL_FAILED=0

pass() { HIL_PASSED=$((HIL_PASSED + 1)); printf 'ok   %s\n' "$*"; }
fail() { HIL_FAILED=$((HIL_FAILED + 1)); printf 'FAIL %s\n' "$*"; }

# check DESCRIPTION CMD...: passes if CMD exits 0.
check() {
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what (exit $?: $*)"; fi
}

# expect_exit CODE DESCRIPTION CMD...: passes if CMD exits with CODE; its stderr is kept in $LAST_ERR.
expect_exit() {
  local code=$1 what=$2; shift 2
  local rc=0
  LAST_ERR=$("$@" 2>&1 >/dev/null) || rc=$?
  if [[ $rc == "$code" ]]; then pass "$what (exit $rc)"; else fail "$what: exit $rc, expected $code; stderr: $LAST_ERR"; fi
}

# contains DESCRIPTION HAYSTACK NEEDLE
contains() {
  if [[ $2 == *"$3"* ]]; then pass "$1"; else fail "$1: '$3' not in: $2"; fi
}

driver_of() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null || echo none; }

hil_summary() {
  printf '%s: %d passed, %d failed\n' "${1:-hil}" "$HIL_PASSED" "$HIL_FAILED"
  ((HIL_FAILED == 0))
}
