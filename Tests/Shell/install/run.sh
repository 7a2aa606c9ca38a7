#!/usr/bin/env bash
# Assertions are handed to `check ... eval` as single-quoted strings, expanded when they run, and
# some variables are read only there.
# shellcheck disable=SC2016,SC2034
#
# Tests of tools/install, all into temporary --destdir trees (never the live system):
#  - bad usage exits 2 and changes nothing; --help exits 0;
#  - one install with the build (tools/install's own `swift build -c release` and man page plugin,
#    a no-op when .build is up to date) into DESTDIR with the default prefix; the tree is listed;
#    the binary runs (--version), the completions and the man page are there and load, the
#    manifest lists exactly the files of the tree, vfio-bind finds its device-type table in
#    ../share/virtio-vfio/ (a fake sysfs with one virtio-rng), and nothing else;
#  - --dry-run creates nothing; every later install reuses that build (--no-build);
#  - --uninstall removes exactly what the manifest lists: the tree is empty afterwards; a file
#    changed since the install and a file it did not install are kept (exit 1); a manifest line
#    outside the prefix is refused before anything is removed;
#  - a source tree with a systemd/ directory gets its units installed (templates filled in).
#
# Usage: Tests/Shell/install/run.sh     prints "install: N passed, N failed"; exit 1 on failure
set -uo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
INSTALL=$REPO/tools/install
WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-test.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
# check DESCRIPTION COMMAND...: ok if COMMAND succeeds, else FAIL with the last command's output.
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else
    bad "$what"
    echo "     exit $RC"
    printf '     stdout| %s\n' "${OUT//$'\n'/$'\n'     stdout| }" | tail -n 15
    printf '     stderr| %s\n' "${ERR//$'\n'/$'\n'     stderr| }" | tail -n 15
  fi
}
# run CMD...: OUT, ERR and RC of the command.
run() {
  OUT=$("$@" 2>"$WORK/stderr"); RC=$?
  ERR=$(<"$WORK/stderr")
}
rc() { [[ $RC == "$1" ]]; }
empty_dir() { [[ -d $1 && -z $(ls -A -- "$1") ]]; }
# The files of a tree, as paths from its root ("/usr/local/bin/virtio-vfio").
files_of() { (cd -- "$1" && find . -type f -printf '/%P\n' | LC_ALL=C sort); }

# ---------------------------------------------------------------- usage
run "$INSTALL" --help
check "--help exits 0 and names every option" eval 'rc 0 && [[ $OUT == *--prefix*--destdir*--no-build*--uninstall*--dry-run* ]]'
for args in "--bogus" "--prefix" "--prefix relative/dir" "--prefix /" "--prefix /usr/../etc" "--destdir" \
  "--uninstall --no-build" "extra-word"; do
  # shellcheck disable=SC2086 # each entry is a list of arguments
  run "$INSTALL" --destdir "$WORK/usage" $args
  check "bad usage '$args' exits 2 and says why" eval 'rc 2 && [[ $ERR == "tools/install: "* ]]'
done
check "bad usage created nothing" eval '[[ ! -e $WORK/usage ]]'

# ---------------------------------------------------------------- dry run
run "$INSTALL" --dry-run --destdir "$WORK/dry"
check "--dry-run exits 0 and says what it would build and install" \
  eval 'rc 0 && [[ $OUT == *"would run: swift build -c release --product virtio-vfio"*"would install $WORK/dry/usr/local/bin/virtio-vfio"* ]]'
check "--dry-run creates nothing" eval '[[ ! -e $WORK/dry ]]'

# ---------------------------------------------------------------- install (the one build)
A=$WORK/a P=/usr/local
start=$(date +%s)
run "$INSTALL" --destdir "$A"
check "install into --destdir exits 0 ($(($(date +%s) - start)) s with the build)" rc 0
echo "--- the --destdir tree (prefix $P):"
(cd "$A" && find . -mindepth 1 \( -type d -printf '%M      %p/\n' -o -printf '%M %4k K %p\n' \) | LC_ALL=C sort -k3)
expected=(
  "$P/bin/virtio-vfio" "$P/sbin/vfio-bind" "$P/share/virtio-vfio/virtio-device-types.tsv"
  "$P/share/virtio-vfio/install-manifest" "$P/lib/udev/rules.d/60-vfio.rules" "$P/share/man/man1/virtio-vfio.1"
  "$P/share/bash-completion/completions/virtio-vfio" "$P/share/zsh/site-functions/_virtio-vfio"
  "$P/share/fish/vendor_completions.d/virtio-vfio.fish"
  "$P/lib/systemd/system/virtio-vfio-blk@.service" "$P/lib/systemd/system/virtio-vfio-net@.service"
  "$P/lib/systemd/system/virtio-vfio-rng@.service"
)
check "the tree holds exactly the expected files" \
  eval '[[ $(files_of "$A") == "$(printf "%s\n" "${expected[@]}" | LC_ALL=C sort)" ]]'
for f in bin/virtio-vfio sbin/vfio-bind; do
  check "$P/$f is executable (0755)" eval '[[ $(stat -c %a "$A$P/$f") == 755 ]]'
done
check "no other file is executable" eval '[[ $(find "$A" -type f -perm /111 | wc -l) == 2 ]]'
check "the units name the installed binary and vfio-bind" \
  eval '[[ $(<"$A$P/lib/systemd/system/virtio-vfio-blk@.service") == *"ExecStart=$P/bin/virtio-vfio serve blk %I"*"ExecReload=$P/bin/virtio-vfio upgrade %I --binary $P/bin/virtio-vfio --mode auto"*"exec $P/sbin/vfio-bind restore %I"* ]]'

version=$(sed -nE '/^#else/,/^#endif/s/.*static let string = "([^"]+)".*/\1/p' "$REPO/Sources/virtio-vfio/DriverVersion.swift")
run "$A$P/bin/virtio-vfio" --version
check "the installed binary runs: --version prints $version" eval 'rc 0 && [[ $OUT == "$version" ]]'
run "$A$P/bin/virtio-vfio" list
check "the installed binary lists PCI functions (read-only)" eval 'rc 0 && [[ $OUT == ADDRESS* ]]'

for f in share/bash-completion/completions/virtio-vfio share/zsh/site-functions/_virtio-vfio \
  share/fish/vendor_completions.d/virtio-vfio.fish share/man/man1/virtio-vfio.1 \
  share/virtio-vfio/virtio-device-types.tsv lib/udev/rules.d/60-vfio.rules; do
  check "$P/$f is not empty (0644)" eval '[[ -s $A$P/$f && $(stat -c %a "$A$P/$f") == 644 ]]'
done
check "60-vfio.rules and the device-type table are the source tree's" \
  eval 'cmp -s "$A$P/lib/udev/rules.d/60-vfio.rules" "$REPO/udev/60-vfio.rules" && cmp -s "$A$P/share/virtio-vfio/virtio-device-types.tsv" "$REPO/tools/virtio-device-types.tsv"'
run bash -c 'source "$1" && complete -p virtio-vfio' _ "$A$P/share/bash-completion/completions/virtio-vfio"
check "the bash completion loads and completes virtio-vfio" eval 'rc 0 && [[ $OUT == *"virtio-vfio"* ]]'
check "the zsh completion is a #compdef for virtio-vfio" eval '[[ $(head -n1 "$A$P/share/zsh/site-functions/_virtio-vfio") == "#compdef virtio-vfio" ]]'
check "the fish completion completes virtio-vfio" grep -q "^complete -c 'virtio-vfio'" "$A$P/share/fish/vendor_completions.d/virtio-vfio.fish"
for sh in zsh fish; do
  if command -v "$sh" >/dev/null; then
    case $sh in zsh) f=share/zsh/site-functions/_virtio-vfio ;; fish) f=share/fish/vendor_completions.d/virtio-vfio.fish ;; esac
    run "$sh" -n "$A$P/$f"
    check "$sh -n accepts its completion" rc 0
  else
    echo "skip $sh -n on its completion: $sh not installed"
  fi
done
check "the man page is mdoc for virtio-vfio(1)" grep -q '^\.Dt VIRTIO-VFIO 1$' "$A$P/share/man/man1/virtio-vfio.1"
if command -v man >/dev/null; then
  run env MANWIDTH=100 man -l "$A$P/share/man/man1/virtio-vfio.1"
  check "man renders it: synopsis, serve blk, upgrade and --mode with its values" \
    eval 'rc 0 && [[ $OUT == *SYNOPSIS*"serve"*"--nbd"*"upgrade"*"--mode"* ]]'
else
  echo "skip rendering the man page: man not installed"
fi

manifest=$A$P/share/virtio-vfio/install-manifest
check "the manifest lists every installed file with its SHA-256, and only those" eval '
  [[ $(sed -nE "s/^file [0-9a-f]{64} //p" "$manifest" | LC_ALL=C sort) == "$(files_of "$A" | grep -vx "$P/share/virtio-vfio/install-manifest")" ]] &&
  while read -r _ sum path; do [[ $(sha256sum <"$A$path" | cut -d" " -f1) == "$sum" ]] || exit 1; done < <(grep "^file " "$manifest")'
check "the manifest lists every directory the install created" \
  eval '[[ $(sed -n "s/^dir //p" "$manifest" | LC_ALL=C sort) == "$(cd "$A" && find . -mindepth 1 -type d -printf "/%P\n" | LC_ALL=C sort)" ]]'

# vfio-bind from the installed location, against a fake sysfs with one virtio-rng function: the
# type comes from the table in ../share/virtio-vfio/, and from no other place.
fake=$WORK/fake S=$WORK/fake/sys
mkdir -p "$S/bus/pci/devices" "$S/bus/pci/drivers/virtio-pci" "$S/kernel/iommu_groups/3/devices" \
  "$S/devices/pci0000:00/0000:00:04.0" "$fake/proc/self" "$fake/proc/net" "$fake/dev"
d=$S/devices/pci0000:00/0000:00:04.0
echo 0x1af4 >"$d/vendor"; echo 0x1044 >"$d/device"; echo 0x00ff00 >"$d/class"; echo '(null)' >"$d/driver_override"
ln -s "$d" "$S/bus/pci/devices/0000:00:04.0"
ln -s "$S/bus/pci/drivers/virtio-pci" "$d/driver"
ln -s "$S/kernel/iommu_groups/3" "$d/iommu_group"; ln -s "$d" "$S/kernel/iommu_groups/3/devices/0000:00:04.0"
: >"$fake/proc/self/mountinfo"; : >"$fake/proc/swaps"; : >"$fake/proc/net/route"; : >"$fake/proc/net/ipv6_route"
bind_status() { # ROOT: the vfio-bind installed under ROOT, `status` on the fake tree
  run env -u VFIO_BIND_DEVICE_TYPES VFIO_BIND_SYSFS="$S" VFIO_BIND_PROC="$fake/proc" VFIO_BIND_DEV="$fake/dev" \
    VFIO_BIND_STATE_DIR="$fake/state" VFIO_BIND_RULES_DIR="$fake/rules" "$1$P/sbin/vfio-bind" status
}
bind_status "$A"
check "the installed vfio-bind names the virtio-rng from its table" eval 'rc 0 && [[ $OUT == *"0000:00:04.0"*"virtio=rng"* ]]'
cp -a "$A" "$WORK/a-copy"
sed -i 's/^4\trng$/4\tentropy/' "$WORK/a-copy$P/share/virtio-vfio/virtio-device-types.tsv"
bind_status "$WORK/a-copy"
check "... read from ../share/virtio-vfio/ (a changed copy there changes the name)" eval 'rc 0 && [[ $OUT == *"virtio=entropy"* ]]'
rm "$WORK/a-copy$P/share/virtio-vfio/virtio-device-types.tsv"
bind_status "$WORK/a-copy"
check "... and without it vfio-bind refuses (exit 4, naming where it looked)" \
  eval 'rc 4 && [[ $ERR == *"virtio-device-types.tsv"*"share/virtio-vfio"* ]]'
rm -rf "$WORK/a-copy"

# ---------------------------------------------------------------- reinstall, uninstall
run "$INSTALL" --no-build --destdir "$A"
check "installing again over it (--no-build) exits 0 and keeps one manifest" \
  eval 'rc 0 && [[ $(grep -c "^file " "$manifest") == 11 && $(grep -c "^dir " "$manifest") == $(cd "$A" && find . -mindepth 1 -type d | wc -l) ]]'
run "$INSTALL" --uninstall --dry-run --destdir "$A"
check "--uninstall --dry-run removes nothing" eval 'rc 0 && [[ $OUT == *"would remove $A$P/bin/virtio-vfio"* && -x $A$P/bin/virtio-vfio && -f $manifest ]]'
run "$INSTALL" --uninstall --destdir "$A"
check "--uninstall exits 0 and leaves nothing" eval 'rc 0 && empty_dir "$A"'
run "$INSTALL" --uninstall --destdir "$A"
check "--uninstall with nothing installed exits 1 and names the missing manifest" \
  eval 'rc 1 && [[ $ERR == *"nothing to uninstall: no manifest at $A$P/share/virtio-vfio/install-manifest"* ]]'

B=$WORK/b
run "$INSTALL" --no-build --prefix /usr --destdir "$B"
check "--no-build --prefix /usr installs under /usr (udev rules in /usr/lib/udev/rules.d)" \
  eval 'rc 0 && [[ -x $B/usr/bin/virtio-vfio && -x $B/usr/sbin/vfio-bind && -s $B/usr/lib/udev/rules.d/60-vfio.rules && -s $B/usr/share/man/man1/virtio-vfio.1 ]]'
echo "# changed by hand" >>"$B/usr/sbin/vfio-bind"
echo "not installed by tools/install" >"$B/usr/share/man/man1/other.1"
run "$INSTALL" --uninstall --prefix /usr --destdir "$B"
check "--uninstall keeps a file changed since the install (exit 1, named) and keeps the manifest" \
  eval 'rc 1 && [[ $ERR == *"kept $B/usr/sbin/vfio-bind"* && -f $B/usr/sbin/vfio-bind && -f $B/usr/share/virtio-vfio/install-manifest ]]'
check "... and a file it did not install, removing the rest" \
  eval '[[ $(files_of "$B") == "$(printf "%s\n" /usr/sbin/vfio-bind /usr/share/man/man1/other.1 /usr/share/virtio-vfio/install-manifest)" ]]'
rm "$B/usr/sbin/vfio-bind" "$B/usr/share/man/man1/other.1"
run "$INSTALL" --uninstall --prefix /usr --destdir "$B"
check "--uninstall again, once they are gone, exits 0 and leaves nothing" eval 'rc 0 && empty_dir "$B"'

C=$WORK/c
run "$INSTALL" --no-build --destdir "$C"
echo "file $(printf '0%.0s' {1..64}) /etc/passwd" >>"$C$P/share/virtio-vfio/install-manifest"
run "$INSTALL" --uninstall --destdir "$C"
check "a manifest line outside the prefix is refused (exit 1) before anything is removed" \
  eval 'rc 1 && [[ $ERR == *"/etc/passwd"*"not under /usr/local"* && -x $C$P/bin/virtio-vfio ]]'

# ---------------------------------------------------------------- systemd units, if the tree has them
# A source tree of its own: tools/install and its inputs, this .build (read only), and systemd/.
src=$WORK/src
mkdir -p "$src/tools" "$src/udev" "$src/systemd"
cp "$INSTALL" "$REPO/tools/vfio-bind" "$REPO/tools/virtio-device-types.tsv" "$src/tools/"
cp "$REPO/udev/60-vfio.rules" "$src/udev/"
printf '[Service]\nExecStart=@bindir@/virtio-vfio serve blk %%I\nExecStartPre=@sbindir@/vfio-bind bind %%I\n' \
  >"$src/systemd/virtio-vfio-blk@.service.in"
printf '[Socket]\nListenStream=/run/x.sock\n' >"$src/systemd/plain.socket"
echo "not a unit" >"$src/systemd/README.md"
run "$src/tools/install" --no-build --destdir "$WORK/u"
check "--no-build without a release build in the tree exits 1 and says so" eval 'rc 1 && [[ $ERR == *"no release build"* ]]'
ln -s "$REPO/.build" "$src/.build"
run "$src/tools/install" --no-build --destdir "$WORK/u"
units=$WORK/u$P/lib/systemd/system
check "systemd/ units are installed into PREFIX/lib/systemd/system (README.md is not)" \
  eval 'rc 0 && [[ $(ls "$units" | tr "\n" " ") == "plain.socket virtio-vfio-blk@.service " ]]'
check "... a .in template with @bindir@ and @sbindir@ filled in" \
  eval '[[ $(<"$units/virtio-vfio-blk@.service") == *"ExecStart=/usr/local/bin/virtio-vfio serve blk %I"*"ExecStartPre=/usr/local/sbin/vfio-bind bind %I"* ]]'
run "$src/tools/install" --uninstall --destdir "$WORK/u"
check "... and removed by --uninstall with the rest" eval 'rc 0 && empty_dir "$WORK/u"'

if command -v shellcheck >/dev/null; then
  run shellcheck "$INSTALL" "$HERE/run.sh"
  check "shellcheck: tools/install and this test are clean" rc 0
else
  echo "skip shellcheck: not installed"
fi

echo "install: $passed passed, $failed failed"
((failed == 0))
