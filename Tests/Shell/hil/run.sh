#!/usr/bin/env bash
# tools/hil/run's choice of emulator and accelerator, checked before anything boots: --accel kvm
# refused in one line where KVM cannot work (this machine), --accel auto falling back to TCG with
# the reason, --qemu refused by name when missing, too old, or without a device or intel-iommu
# property the harness uses (fake qemu-system-x86_64 scripts stand in for such builds); --noiommu
# refused where it cannot work.
#
# Usage: Tests/Shell/hil/run.sh     prints "hil-options: N passed, N failed"; exit 1 on failure
set -uo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
RUN=$REPO/tools/hil/run
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hil-options.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
. "$REPO/tools/hil/lib.sh"

# run ARGS...: tools/hil/run with ARGS, $RC and $ERR (stderr).
run() { OUT=$(HIL_BUILD=0 "$RUN" "$@" 2>"$WORK/err"); RC=$?; ERR=$(<"$WORK/err"); }

# fake NAME VERSION DEVICES IOMMU_PROPERTIES: a stand-in qemu-system-x86_64.
fake() {
  local f=$WORK/$1
  cat >"$f" <<SH
#!/bin/sh
case "\$*" in
  --version) echo "QEMU emulator version $2 (fake)" ;;
  *"-device help"*) for d in $3; do echo "name \"\$d\", bus PCI"; done ;;
  *"intel-iommu,help"*) for p in $4; do echo "  \$p=<bool>"; done ;;
esac
SH
  chmod +x "$f"
  echo "$f"
}

if why=$(hil_kvm_problem); then
  echo "skip KVM refusal: KVM is usable on this machine"
else
  run --accel kvm -- true
  [[ $RC == 2 && $(wc -l <<<"$ERR") == 1 && $ERR == "hil: error: --accel kvm: KVM is not usable here: $why (use --accel tcg or auto)" ]] \
    && ok "--accel kvm refused in one line (exit 2): $why" || bad "--accel kvm: exit $RC: $ERR"
  run --accel auto --prepare
  [[ $RC == 0 && $ERR == *"hil: accelerator: TCG (auto: KVM is not usable here: $why)"* ]] \
    && ok "--accel auto falls back to TCG and says why" || bad "--accel auto: exit $RC: $ERR"
fi
run --accel xen -- true
[[ $RC == 2 && $ERR == *"--accel wants kvm, tcg or auto, got 'xen'"* ]] && ok "an unknown accelerator is refused" || bad "--accel xen: exit $RC: $ERR"

run --qemu "$WORK/none" -- true
[[ $RC == 2 && $ERR == "hil: error: --qemu $WORK/none: no such executable" ]] && ok "a missing --qemu is refused by name" || bad "missing qemu: exit $RC: $ERR"
run --qemu no-such-qemu -- true
[[ $RC == 2 && $ERR == "hil: error: --qemu no-such-qemu: not found on PATH" ]] && ok "a --qemu name not on PATH is refused" || bad "qemu not on PATH: exit $RC: $ERR"
all="intel-iommu virtio-9p-pci virtio-rng-pci virtio-blk-pci virtio-net-pci"
old=$(fake old 4.2.1 "$all" "intremap caching-mode")
run --qemu "$old" -- true
[[ $RC == 2 && $ERR == *"--qemu $old: QEMU 4.2.1 is older than $HIL_QEMU_MINIMUM, which the harness needs" ]] \
  && ok "a QEMU older than $HIL_QEMU_MINIMUM is refused with its version" || bad "old qemu: exit $RC: $ERR"
noiommu=$(fake noiommu 8.2.0 "virtio-9p-pci virtio-rng-pci virtio-blk-pci virtio-net-pci" "")
run --qemu "$noiommu" -- true
[[ $RC == 2 && $ERR == *"QEMU 8.2.0 has no device intel-iommu" ]] && ok "a QEMU without intel-iommu is refused by name" || bad "no intel-iommu: exit $RC: $ERR"
nointremap=$(fake nointremap 8.2.0 "$all" "caching-mode")
run --qemu "$nointremap" -- true
[[ $RC == 2 && $ERR == *"intel-iommu has no intremap property (interrupt remapping)" ]] && ok "a QEMU whose intel-iommu cannot remap interrupts is refused" || bad "no intremap: exit $RC: $ERR"
good=$(fake good 9.1.0 "$all" "intremap caching-mode")
[[ $(hil_qemu_problem "$good") == "QEMU 9.1.0" ]] && ok "a QEMU with everything the harness uses passes the check" || bad "good fake: $(hil_qemu_problem "$good")"
[[ $(hil_qemu_problem "$(command -v qemu-system-x86_64)") == "QEMU "* ]] && ok "this machine's QEMU passes: $(hil_qemu_problem "$(command -v qemu-system-x86_64)")" \
  || bad "this machine's QEMU: $(hil_qemu_problem "$(command -v qemu-system-x86_64)")"

# --noiommu (a guest without an IOMMU, VFIO in no-IOMMU mode): only with the 6.1 kernel it
# builds vfio.ko for, and not with the matrix's iommu_platform devices; refused before anything.
run --noiommu --kernel 6.12 -- true
[[ $RC == 2 && $ERR == "hil: error: --noiommu builds vfio.ko for the 6.1 guest kernel only, not '6.12'" ]] \
  && ok "--noiommu with kernel 6.12 is refused by name" || bad "--noiommu --kernel 6.12: exit $RC: $ERR"
run --noiommu --matrix -- true
[[ $RC == 2 && $ERR == *"--noiommu and --matrix do not go together"* ]] \
  && ok "--noiommu with --matrix is refused" || bad "--noiommu --matrix: exit $RC: $ERR"

echo "hil-options: $passed passed, $failed failed"
((failed == 0))
