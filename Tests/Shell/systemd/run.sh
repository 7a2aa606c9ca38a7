#!/usr/bin/env bash
# The systemd template units in systemd/*.service.in (installed by tools/install with @bindir@
# and @sbindir@ filled in): each, with the placeholders replaced by this checkout's paths, passes `systemd-analyze
# verify` for an instance, and says what the driver needs from its manager: Type=notify with
# NotifyAccess=all (the successor a reload starts reports READY from its own pid), ExecStart the
# right `serve`, ExecReload a hot upgrade to the installed binary, the device bound before and
# given back after. (Running them under systemd is the HIL's job; not here.)
#
# Usage: Tests/Shell/systemd/run.sh     prints "systemd-units: N passed, N failed"; exit 1 on failure
set -uo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bin=$REPO/.build/debug
[[ -x $bin/virtio-vfio ]] || bin=$work/bin
if [[ $bin == "$work/bin" ]]; then
  # verify only needs the programs to exist and be executable: stand-ins when nothing is built.
  mkdir -p "$bin"; printf '#!/bin/sh\nexit 0\n' >"$bin/virtio-vfio"; chmod +x "$bin/virtio-vfio"
fi
command -v systemd-analyze >/dev/null || { bad "systemd-analyze is missing (Debian package systemd; tools/hil/run --prepare installs it)"; echo "systemd-units: $passed passed, $failed failed"; exit 1; }

for kind in blk rng net; do
  template=$REPO/systemd/virtio-vfio-$kind@.service.in
  [[ -f $template ]] || { bad "$template is missing"; continue; }
  grep -q '@bindir@' "$template" && grep -q '@sbindir@' "$template" && ok "$kind: the template names its directories by placeholder (tools/install fills them in)" || bad "$kind: no placeholders"
  unit=$work/virtio-vfio-$kind@.service
  sed -e "s|@bindir@|$bin|g; s|@sbindir@|$REPO/tools|g" "$template" >"$unit"
  # Instance names with ':' (PCI addresses) are fine for systemctl, but systemd-analyze verify
  # 252 takes the ':' of a path argument for something else: verify the template as "test".
  out=$(cd "$work" && systemd-analyze verify --man=no "$work/virtio-vfio-$kind@test.service" 2>&1); rc=$?
  [[ $rc == 0 && -z $out ]] && ok "$kind: systemd-analyze verify passes with nothing to say" || bad "$kind: verify exit $rc: $out"
  grep -qx 'Type=notify' "$unit" && grep -qx 'NotifyAccess=all' "$unit" && ok "$kind: Type=notify, NotifyAccess=all" || bad "$kind: notify settings"
  # rng and blk keep their descriptors in the manager's store for a restart after a crash.
  store=""; [[ $kind == net ]] || store=" --fd-store"
  grep -qx "ExecStart=$bin/virtio-vfio serve $kind %I$store \$VIRTIO_VFIO_ARGS" "$unit" && ok "$kind: ExecStart serves the instance's device$store" || bad "$kind: $(grep ExecStart= "$unit")"
  if [[ -n $store ]]; then
    grep -qx "FileDescriptorStoreMax=16" "$unit" && ok "$kind: the manager keeps up to 16 descriptors" || bad "$kind: no FileDescriptorStoreMax=16"
  fi
  grep -qx "ExecReload=$bin/virtio-vfio upgrade %I --binary $bin/virtio-vfio --mode auto" "$unit" && ok "$kind: reload is a hot upgrade to the installed binary" || bad "$kind: $(grep ExecReload= "$unit")"
  grep -qx "ExecStartPre=$REPO/tools/vfio-bind bind %I" "$unit" \
    && grep -qx "ExecStopPost=/bin/sh -c 'if \[ \"\$SERVICE_RESULT\" = success \]; then exec $REPO/tools/vfio-bind restore %I; fi'" "$unit" \
    && ok "$kind: the device is bound before, and given back after a clean stop (kept for the restart after a crash)" || bad "$kind: bind/restore lines: $(grep -E 'ExecStartPre|ExecStopPost' "$unit")"
done
# The reload and start command lines parse with the real binary (when it is built).
if [[ -x $REPO/.build/debug/virtio-vfio ]]; then
  v=$REPO/.build/debug/virtio-vfio
  $v upgrade --help >/dev/null 2>&1 && $v serve blk --help >/dev/null 2>&1 && ok "virtio-vfio upgrade and serve answer --help" || bad "virtio-vfio --help"
fi
echo "systemd-units: $passed passed, $failed failed"
((failed == 0))
