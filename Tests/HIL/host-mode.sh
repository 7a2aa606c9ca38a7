#!/usr/bin/env bash
# HIL test of tools/hil/host-run (issue 19), inside the guest, which is a machine with VFIO like
# any other: the suites run in host mode from a device map that gives the roles to other
# functions than the default map (blk and its baseline swapped, net and its peer swapped), with a
# JUnit report parsed back; host-run refuses a map naming a missing function, a function whose
# disk is mounted and one whose interface is up, before touching anything; and after a suite that
# dies holding devices, namespaces and an NBD connection, and after Ctrl-C in the middle of one,
# every function is back on its own driver.
# Environment: HOST_MODE_SUITES (default "rng.sh nbd.sh net.sh").
set -uo pipefail
cd "$(dirname "$0")/../.."
. Tests/HIL/lib.sh
need_roles rng blk blk-baseline net net-peer
work=$(mktemp -d)
dmesg -n 1
# drivers: every mapped function with its driver, one line.
drivers() { local r; for r in rng blk blk-baseline net net-peer; do printf '%s=%s ' "$(role "$r")" "$(driver_of "$(role "$r")")"; done; }
initial=$(drivers)
cat >"$work/swapped.map" <<EOF
# The default map with blk and net swapped with their peers.
rng           $(role rng)
blk           $(role blk-baseline)
blk-baseline  $(role blk)
net           $(role net-peer)
net-peer      $(role net)
root-share    $(role root-share)
EOF

# ---- the suites from a map with other roles ----------------------------------------------------------
suites=${HOST_MODE_SUITES:-rng.sh nbd.sh net.sh}
# shellcheck disable=SC2086 # a list of suites
# Its output as it comes, indented (its checks are counted here as one).
timeout 2400 tools/hil/host-run --map "$work/swapped.map" --junit "$work/junit.xml" -- $suites 2>&1 | tee "$work/run.log" | sed -u 's/^/  | /'
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] && pass "host-run --map (swapped roles) -- $suites: $(tail -n 1 "$work/run.log")" || fail "host-run exit $rc: $(tail -n 15 "$work/run.log")"
# section SUITE: the lines host-run printed for one suite.
section() { sed -n "/^### .*$1\$/,/^### /p" "$work/run.log"; }
section net.sh | grep -q "^roles: net=$(role net-peer) net-peer=$(role net) " \
  && section net.sh | grep -q "^ok   vtap0 has the device's MAC $(cat /sys/bus/pci/devices/$(role net-peer)/virtio*/net/*/address)" \
  && pass "net.sh drove the function the map calls net ($(role net-peer), its own MAC on the TAP), the other as its peer" \
  || fail "net.sh did not follow the map: $(section net.sh | head -n 5)"
section nbd.sh | grep -q "^roles: blk=$(role blk-baseline) " && pass "nbd.sh drove the map's blk ($(role blk-baseline))" \
  || fail "nbd.sh did not follow the map: $(section nbd.sh | head -n 5)"
[[ $(drivers) == "$initial" ]] && pass "every function is on its driver again: $(drivers)" || fail "drivers after: $(drivers); before: $initial"
python3 - "$work/junit.xml" "$work/run.log" >"$work/junit.check" 2>&1 <<'PY'
import re, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
log = open(sys.argv[2]).read().splitlines()
checks = [l for l in log if re.match(r"^(ok|FAIL|skip)\s", l)]
cases = root.findall("./testsuite/testcase")
names = {s.get("name") for s in root.findall("testsuite")}
print("cases %d checks %d suites %s failures %s" % (len(cases), len(checks), sorted(names), root.get("failures")))
sys.exit(0 if len(cases) == len(checks) and len(cases) > 0 and root.get("failures") == str(sum(1 for c in checks if c.startswith("FAIL"))) else 1)
PY
[[ $? == 0 ]] && pass "the JUnit report has one case per check: $(cat "$work/junit.check")" || fail "JUnit report: $(cat "$work/junit.check")"

# ---- refusals before anything is touched --------------------------------------------------------------
sed "s|^rng .*|rng 0000:00:1e.7|" "$work/swapped.map" >"$work/missing.map"
expect_exit 2 "host-run refuses a map naming a function this machine lacks" tools/hil/host-run --map "$work/missing.map"
contains "the refusal names the role and the function" "$LAST_ERR" "role rng the function '0000:00:1e.7'"
kdev=$(ls /sys/bus/pci/devices/$(role blk-baseline)/virtio*/block | head -n1)
mkfs.ext4 -q -F /dev/$kdev 64M && mkdir -p "$work/mnt" && mount /dev/$kdev "$work/mnt"
expect_exit 2 "host-run refuses a map whose blk disk is mounted" tools/hil/host-run --map "$work/swapped.map"
contains "the refusal names the mount" "$LAST_ERR" "/dev/$kdev is mounted on $work/mnt"
umount "$work/mnt"
peer_if=$(net_if "$(role net)")
ip link set "$peer_if" up
expect_exit 2 "host-run refuses a map whose net-peer interface is up" tools/hil/host-run --map "$work/swapped.map"
contains "the refusal names the interface" "$LAST_ERR" "interface $peer_if is up"
ip link set "$peer_if" down
[[ $(drivers) == "$initial" ]] && pass "the refusals changed no driver" || fail "drivers after the refusals: $(drivers)"

# ---- a suite that dies holding everything; Ctrl-C in the middle of one --------------------------------
cat >"$work/dies.sh" <<'EOF'
#!/usr/bin/env bash
# Takes blk (serve blk + a kernel NBD connection), net (serve net, its TAP and the peer in
# namespaces) and the rng, then dies without giving anything back. With HOLD=1 it waits instead.
. Tests/HIL/lib.sh
vfio-bind bind "$(role blk)" "$(role net)" "$(role rng)" >/dev/null
virtio-vfio serve blk "$(role blk)" --nbd unix:/tmp/dies.sock 2>/dev/null &
virtio-vfio serve net "$(role net)" --tap vdies0 2>/dev/null &
for _ in $(seq 100); do [[ -S /tmp/dies.sock ]] && ip link show vdies0 >/dev/null 2>&1 && break; sleep 0.1; done
nbd-client -unix /tmp/dies.sock /dev/nbd1 -b 4096 -N "" >/dev/null 2>&1
ip netns add dies-A && ip link set vdies0 netns dies-A
ip netns add dies-B && ip link set "$(net_if "$(role net-peer)")" netns dies-B
[[ -e /sys/block/nbd1/pid ]] && pass "holding blk, net, rng, /dev/nbd1 and two namespaces" || fail "could not take everything"
[[ ${HOLD:-0} == 1 ]] && { echo "holding"; sleep 600; }
kill -9 $$
EOF
chmod +x "$work/dies.sh"
timeout 300 tools/hil/host-run --map "$work/swapped.map" -- "$work/dies.sh" >"$work/dies.log" 2>&1; rc=$?
[[ $rc == 1 ]] && pass "host-run: the dying suite fails the run (exit 1)" || fail "dying suite: exit $rc: $(tail -n 10 "$work/dies.log")"
grep -q "every function is back on its driver" "$work/dies.log" && [[ $(drivers) == "$initial" ]] \
  && pass "after the suite died holding them, every function is back: $(drivers)" || fail "after the dying suite: $(drivers); $(tail -n 10 "$work/dies.log")"
[[ -z $(ip netns list | grep dies-) && ! -e /sys/block/nbd1/pid ]] && pass "its namespaces and NBD connection are gone" \
  || fail "left: $(ip netns list) $(ls /sys/block/nbd1/pid 2>/dev/null)"
HOLD=1 timeout 300 tools/hil/host-run --map "$work/swapped.map" -- "$work/dies.sh" >"$work/int.log" 2>&1 &
hr=$!
for _ in $(seq 600); do grep -q "^holding$" "$work/int.log" && break; sleep 0.1; done
grep -q "^holding$" "$work/int.log" && pass "a suite holds the devices" || fail "the holding suite did not start: $(tail -n 5 "$work/int.log")"
kill -INT $hr; wait $hr; rc=$?
[[ $rc == 130 ]] && grep -q "SIGINT: stopping the suites and giving every function back" "$work/int.log" \
  && pass "Ctrl-C: host-run stops the suite (exit 130)" || fail "after SIGINT: exit $rc: $(tail -n 10 "$work/int.log")"
[[ $(drivers) == "$initial" && -z $(ip netns list | grep dies-) ]] && pass "after Ctrl-C every function is back: $(drivers)" \
  || fail "after Ctrl-C: $(drivers); $(ip netns list)"
rm -rf "$work"
hil_summary host-mode
