#!/usr/bin/env bash
# On a kernel without VFIO (the development and CI machines): list works, info/reset refuse with
# exit 69 and point to the HIL harness, before opening or writing anything. Never touches a device:
# only read-only commands run against this machine's PCI functions.
set -uo pipefail
cd "$(dirname "$0")/../../.."
bin=.build/debug/virtio-vfio
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }

if [[ -e /dev/vfio/vfio ]]; then
  echo "this kernel has VFIO: the no-VFIO checks do not apply here"
  echo "no-vfio: 0 passed, 0 failed"; exit 0
fi
out=$($bin list) && ok "list works without VFIO" || bad "list exited $?"
[[ $out == *ADDRESS*DRIVER*GROUP*VIRTIO* ]] && ok "list prints its table" || bad "list output: $out"
$bin list --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert isinstance(d, list) and d' \
  && ok "list --json is a JSON array" || bad "list --json"
first=$($bin list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["address"])')
driver_before=$(readlink "/sys/bus/pci/devices/$first/driver" || true)
for cmd in "info $first" "reset $first" "info $first --json"; do
  err=$($bin $cmd 2>&1 >/dev/null); rc=$?
  [[ $rc == 69 ]] && ok "$cmd exits 69" || bad "$cmd exited $rc: $err"
  [[ $err == *"VFIO is not available in this kernel"*"tools/hil/run"* ]] && ok "$cmd names the cause and the HIL harness" \
    || bad "$cmd message: $err"
done
[[ $(readlink "/sys/bus/pci/devices/$first/driver" || true) == "$driver_before" ]] && ok "the device's driver is unchanged" \
  || bad "driver of $first changed"
# Bad arguments are refused before anything is opened (exit 64, the rule named).
for args in "--tap a:b" "--tap .." "--tap 0123456789abcdef" "--tap x --irq hybrid"; do
  # shellcheck disable=SC2086 # each entry is a list of options
  err=$($bin serve net "$first" $args 2>&1 >/dev/null); rc=$?
  [[ $rc == 64 && $err == *"--"* ]] && ok "serve net $args refused (exit 64)" || bad "serve net $args: exit $rc: $err"
done
dir=$(mktemp -d)
err=$($bin upgrade "$first" --binary "$bin" --control-directory "$dir" 2>&1 >/dev/null); rc=$?
[[ $rc == 69 && $err == *"no driver serves $first"* ]] && ok "upgrade without a serving driver exits 69 and says so" || bad "upgrade: exit $rc: $err"
rm -rf "$dir"
echo "no-vfio: $passed passed, $failed failed"
((failed == 0))
