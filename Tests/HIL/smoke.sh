#!/usr/bin/env bash
# A short HIL check for another guest kernel: list, bind, info, reset, restore of the rng.
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng
RNG=$(role rng)
check "kernel $(uname -r): list shows the rng" sh -c "virtio-vfio list --virtio | grep -q '$RNG .* rng '"
check "bind rng" vfio-bind bind $RNG
check "info rng" virtio-vfio info $RNG
check "reset rng --cycles 10" virtio-vfio reset $RNG --cycles 10 --quiet
check "restore rng" vfio-bind restore $RNG
[[ $(driver_of $RNG) == virtio-pci ]] && pass "rng back on virtio-pci" || fail "rng on $(driver_of $RNG)"
hil_summary "smoke $(uname -r)"
