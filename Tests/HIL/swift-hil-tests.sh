#!/usr/bin/env bash
# Runs the Swift HILTests (Tests/HILTests) inside the guest, against the rng bound to vfio-pci.
# The test binary is the one `swift test` / `swift build --build-tests` built on the host.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng
RNG=$(role rng)
bin=$(ls -d .build/debug/*PackageTests.xctest 2>/dev/null | head -n1)
if [[ -z $bin ]]; then fail "no test binary: run 'swift build --build-tests' on the host first"; hil_summary swift-hil; exit; fi
check "bind rng for the Swift HIL tests" vfio-bind bind $RNG >/dev/null
out=$(VIRTIO_VFIO_HIL_RNG=$RNG "$bin" --testing-library swift-testing --filter HILTests 2>&1); rc=$?
grep -E '✘|✔|Test run' <<<"$out"
n=$(grep -oE 'Test run with [0-9]+ tests?' <<<"$out" | grep -oE '[0-9]+' | tail -n1)
bad=$(grep -cE '^✘ Test [^r]' <<<"$out")
if [[ $rc == 0 && ${n:-0} -gt 0 ]]; then HIL_PASSED=$((HIL_PASSED + n)); else
  HIL_FAILED=$((HIL_FAILED + (bad > 0 ? bad : 1))); HIL_PASSED=$((HIL_PASSED + ${n:-0} - bad)); printf '%s\n' "$out" | tail -n 40; fi
check "restore rng" vfio-bind restore $RNG >/dev/null
hil_summary swift-hil
