# Helpers for HIL test scripts (run inside the guest by tools/hil/run, or on a machine with VFIO by
# tools/hil/host-run). Each check prints one line; hil_summary prints "N passed, N failed" (and
# ", N skipped") and returns non-zero if anything failed.
HIL_PASSED=0
HIL_FAILED=0
HIL_SKIPPED=0
# The device map (tools/hil/devices.map: the QEMU guest's) says which function plays which role.
HIL_MAP=${HIL_MAP:-tools/hil/devices.map}

pass() { HIL_PASSED=$((HIL_PASSED + 1)); printf 'ok   %s\n' "$*"; }
skip() { HIL_SKIPPED=$((HIL_SKIPPED + 1)); printf 'skip %s\n' "$*"; }
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
# net_if BDF: the kernel interface of a virtio-net PCI function (under its virtioN child).
net_if() { local d; for d in /sys/bus/pci/devices/$1/virtio*/net/*; do [[ -e $d ]] && basename "$d"; done; }

# role NAME: the PCI address (0000:00:05.0 form) the map gives NAME, or nothing.
role() {
  local a
  a=$(awk -v r="$1" '$1 !~ /^#/ && $1 == r { print $2; exit }' "$HIL_MAP" 2>/dev/null)
  [[ -z $a || $a == ????:* ]] || a=0000:$a
  printf '%s' "$a"
}

# need_roles NAME...: the script ends here, as skipped, with a line naming what is missing, unless
# the map has every role named.
need_roles() {
  local r missing=()
  [[ -r $HIL_MAP ]] || { fail "the device map $HIL_MAP cannot be read"; hil_summary "$(basename "$0" .sh)"; exit 1; }
  for r in "$@"; do [[ -n $(role "$r") ]] || missing+=("$r"); done
  if ((${#missing[@]} == 0)); then
    echo "roles: $(for r in "$@"; do printf '%s=%s ' "$r" "$(role "$r")"; done)"
    return 0
  fi
  skip "$(basename "$0"): the device map $HIL_MAP has no ${missing[*]} role"
  hil_summary "$(basename "$0" .sh)"
  exit 0
}

hil_summary() {
  printf '%s: %d passed, %d failed' "${1:-hil}" "$HIL_PASSED" "$HIL_FAILED"
  ((HIL_SKIPPED == 0)) || printf ', %d skipped' "$HIL_SKIPPED"
  printf '\n'
  ((HIL_FAILED == 0))
}
