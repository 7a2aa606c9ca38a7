# Shared by the HIL scripts that run a unit under systemd (tools/hil/run --init systemd); sourced
# after lib.sh with $unit set ("virtio-vfio-KIND@ADDRESS.service").
#   systemd_begin             refuses to go on unless PID 1 is systemd; makes $work (on /run:
#                             starting a unit pulls in sysinit.target, whose tmpfiles empties /tmp)
#   install_unit KIND [LINE]  tools/install into $prefix (the guest's root is the host's, read-only),
#                             the unit into /run/systemd/system with a drop-in: vfio-bind remembers
#                             drivers under /run (the guest's /var is read-only), plus LINE...
#   wait_active NOT_PID       until the unit is active with a main pid other than NOT_PID (30 s);
#                             prints the pid
#   finish [N]                the unit's last N journal lines (30), the summary, exit
prefix=/run/virtio-vfio-install

finish() { journalctl -b --no-pager -u "$unit" 2>/dev/null | tail -n "${1:-30}" | sed 's/^/  journal: /'; hil_summary systemd; exit; }

systemd_begin() {
  if [[ $(cat /proc/1/comm) != systemd ]]; then
    fail "PID 1 is $(cat /proc/1/comm), not systemd: run this with tools/hil/run --init systemd"
    finish
  fi
  work=$(mktemp -d -p /run)
}

install_unit() {
  local kind=$1; shift
  timeout 120 tools/install --no-build --prefix "$prefix" >"$work/install.log" 2>&1 \
    && pass "tools/install --no-build --prefix $prefix" || { fail "install: $(tail -n 5 "$work/install.log")"; finish; }
  mkdir -p "/run/systemd/system/virtio-vfio-$kind@.service.d"
  cp "$prefix/lib/systemd/system/virtio-vfio-$kind@.service" /run/systemd/system/
  { printf '[Service]\nEnvironment=VFIO_BIND_STATE_DIR=/run/vfio-bind\n'; for line in "$@"; do printf '%s\n' "$line"; done; } \
    >"/run/systemd/system/virtio-vfio-$kind@.service.d/hil.conf"
  check "systemctl daemon-reload" timeout 60 systemctl daemon-reload
}

mainpid() { systemctl show -p MainPID --value "$unit"; }

wait_active() {
  local p
  for _ in $(seq 300); do
    p=$(mainpid)
    [[ $(systemctl is-active "$unit") == active && $p != 0 && $p != "$1" ]] && { echo "$p"; return 0; }
    sleep 0.1
  done
  echo "$p"; return 1
}
