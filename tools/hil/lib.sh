# shellcheck shell=bash
# Expects HIL_DIR (tools/hil) and HIL_CACHE_DIR; sets HIL_VMLINUX, HIL_INITRD
# and HIL_KVER for the caller.
# shellcheck disable=SC2034 # results are read by tools/hil/run
# tools/hil/lib.sh: host-side helpers for tools/hil/run (sourced, not executed).
#
# Owns: host package checks, the guest kernel cache (download, unpack, depmod,
# vmlinux extraction) and the initramfs cache. Everything lives in
# $HIL_CACHE_DIR (default $PROJECT/.hil-cache) and is built under an flock so
# that parallel runs never race; finished artefacts are published by an atomic
# rename or a final .ready marker and never modified afterwards, so a warm run
# reads them without taking the lock.
#
# Functions that may fail or run apt return their results in HIL_* globals
# rather than on stdout, so they never run in a subshell: hil_die then really
# ends the run and "apt-get update" really happens at most once.

# Host packages the harness and the guest tests need (the guest runs the host's
# binaries over 9p). rngtest comes from rng-tools5 (rng-tools conflicts with it);
# jq builds `vfio-bind status --json`; gcc-12, make and binutils build the
# no-IOMMU vfio.ko (tools/hil/vfio-noiommu, tools/hil/run --noiommu).
HIL_HOST_PACKAGES=(
  qemu-system-x86 busybox-static pciutils libpci-dev cpio xz-utils zstd kmod
  nbd-client qemu-utils libnbd-bin fio e2fsprogs iperf3 rng-tools5 iproute2
  iputils-ping jq systemd curl
  gcc-12 make binutils
)

# Modules packed into the initramfs and insmod'ed by the guest /init, in this
# order (dependencies found by depmod are put first automatically).
# "NAME PARAM=VALUE..." passes parameters to insmod. A leading "?" marks a
# module that some kernels do not have at all (6.12 merged vfio_virqfd into
# vfio, and 6.1 has no ublk_drv); modules built into the kernel (modules.builtin) are skipped.
# virtio_pci comes last so the other virtio drivers are ready when it claims
# every virtio device (the 9p shares need it anyway; tests move devices to
# vfio-pci themselves with tools/vfio-bind).
HIL_MODULES=(
  virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
  netfs ?fscache 9pnet 9pnet_virtio 9p
  irqbypass vfio ?vfio_virqfd vfio_iommu_type1 vfio_pci_core vfio_pci
  failover net_failover virtio_net virtio_blk virtio_rng
  "nbd nbds_max=4" ?ublk_drv tun overlay
  crc16 crc32c_generic libcrc32c mbcache jbd2 ext4
  virtio_pci
)

# Bump when the initramfs layout changes in a way the cache key cannot see.
HIL_INITRAMFS_FORMAT=1

hil_note() { printf 'hil: %s\n' "$*" >&2; }

# The oldest QEMU the harness is known to need: q35 with kernel-irqchip=split, intel-iommu with
# intremap and caching-mode, virtio-9p with multidevs=remap (5.0); this machine runs 7.2.
HIL_QEMU_MINIMUM=6.0
# Devices (and intel-iommu properties) every run uses.
HIL_QEMU_DEVICES=(intel-iommu virtio-9p-pci virtio-rng-pci virtio-blk-pci virtio-net-pci)

# hil_qemu_problem QEMU: prints "QEMU X.Y.Z" and succeeds if QEMU can run the harness's guest;
# otherwise prints what is missing and fails.
hil_qemu_problem() {
  local q=$1 version devices props
  [[ -x $q && -f $q ]] || { echo "no such executable"; return 1; }
  version=$("$q" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9]*\.[0-9][0-9]*\(\.[0-9][0-9]*\)\?\).*/\1/p' | head -n 1)
  [[ -n $version ]] || { echo "does not answer --version like qemu-system-x86_64 ('QEMU emulator version X.Y.Z')"; return 1; }
  if [[ $(printf '%s\n%s\n' "$HIL_QEMU_MINIMUM" "$version" | sort -V | head -n 1) != "$HIL_QEMU_MINIMUM" ]]; then
    echo "QEMU $version is older than $HIL_QEMU_MINIMUM, which the harness needs"; return 1
  fi
  devices=$("$q" -nodefaults -machine none -device help 2>/dev/null)
  local d
  for d in "${HIL_QEMU_DEVICES[@]}"; do
    grep -q "name \"$d\"" <<<"$devices" || { echo "QEMU $version has no device $d"; return 1; }
  done
  props=$("$q" -nodefaults -machine none -device intel-iommu,help 2>/dev/null)
  for d in intremap caching-mode; do
    grep -q "^ *$d=" <<<"$props" || { echo "QEMU $version's intel-iommu has no $d property (interrupt remapping)"; return 1; }
  done
  echo "QEMU $version"
}

# hil_kvm_problem: succeeds if KVM can run a guest here; otherwise prints why not and fails.
hil_kvm_problem() {
  [[ -e /dev/kvm ]] || { echo "there is no /dev/kvm (the kvm modules are not loaded, or this is a VM without nested virtualization)"; return 1; }
  local fd
  { exec {fd}<>/dev/kvm; } 2>/dev/null || { echo "/dev/kvm cannot be opened for reading and writing by $(id -un) (the kvm group)"; return 1; }
  exec {fd}>&-
  grep -qwE 'vmx|svm' /proc/cpuinfo || { echo "/dev/kvm exists but the CPU shows neither vmx nor svm (no hardware virtualization; in a VM, nested virtualization is off)"; return 1; }
}
hil_die() {
  printf 'hil: error: %s\n' "$*" >&2
  exit 2
}

# Run apt-get update at most once per run.
HIL_APT_UPDATED=0
hil_apt_update() {
  ((HIL_APT_UPDATED)) && return 0
  hil_note "apt-get update"
  apt-get update -qq >/dev/null || hil_die "apt-get update failed"
  HIL_APT_UPDATED=1
}

# 1. Install missing host packages. A warm run costs one dpkg-query call.
hil_ensure_packages() {
  local missing=() pkg installed
  installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${HIL_HOST_PACKAGES[@]}" 2>/dev/null || true)
  for pkg in "${HIL_HOST_PACKAGES[@]}"; do
    [[ $'\n'$installed$'\n' == *$'\n'"$pkg install ok installed"$'\n'* ]] || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || hil_die "missing packages (${missing[*]}); run as root or install them"
  hil_note "installing ${missing[*]}"
  hil_apt_update
  local log
  log=$(mktemp "${TMPDIR:-/tmp}/hil-apt.XXXXXX")
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${missing[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    hil_die "apt-get install ${missing[*]} failed (log above, kept at $log)"
  fi
  rm -f "$log"
}

# Take the cache lock (exclusive, blocking); it is released by hil_unlock or
# when the process exits.
HIL_LOCK_FD=
hil_lock() {
  [[ -n $HIL_LOCK_FD ]] && return 0
  exec {HIL_LOCK_FD}>"$HIL_CACHE_DIR/.lock"
  if ! flock -n "$HIL_LOCK_FD"; then
    hil_note "waiting for the cache lock ($HIL_CACHE_DIR/.lock)"
    flock "$HIL_LOCK_FD"
  fi
}
hil_unlock() {
  [[ -n $HIL_LOCK_FD ]] || return 0
  exec {HIL_LOCK_FD}>&-
  HIL_LOCK_FD=
}

# The meta-package that names the current kernel of a flavour.
hil_meta_package() {
  case $1 in
    6.1) echo linux-image-amd64 ;;
    6.12) echo linux-image-6.12-amd64 ;;
    *) return 1 ;;
  esac
}

# A package version as a file name.
hil_sanitize() { printf '%s' "$1" | tr -c 'A-Za-z0-9.+-' '_'; }

# Ask apt for the concrete kernel package behind meta-package $1 and its
# candidate version: sets HIL_PKG and HIL_VER, fails if apt does not know them.
hil_apt_resolve() {
  # awk reads all of its input: an early exit would SIGPIPE apt (pipefail).
  HIL_PKG=$(apt-cache depends "$1" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && !p { p = $2 } END { print p }')
  [[ -n $HIL_PKG ]] || return 1
  HIL_VER=$(apt-cache show --no-all-versions "$HIL_PKG" 2>/dev/null |
    awk '$1 == "Version:" && !v { v = $2 } END { print v }')
  [[ -n $HIL_VER ]]
}

# Is the cached resolution of flavour $1 still current (apt lists unchanged)?
hil_resolution_fresh() {
  local stamp="$HIL_CACHE_DIR/resolved-$1"
  [[ -s $stamp ]] &&
    [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -newer "$stamp" -print -quit 2>/dev/null) ]]
}

# Set HIL_PKG and HIL_VER for flavour $1. apt-cache costs ~0.5 s, so the answer
# is cached in resolved-FLAVOUR and asked again only when apt's lists change.
# Caller holds the lock.
hil_resolve_kernel() {
  local flavour=$1 stamp="$HIL_CACHE_DIR/resolved-$1" meta
  if hil_resolution_fresh "$flavour"; then
    read -r HIL_PKG HIL_VER <"$stamp"
    return 0
  fi
  meta=$(hil_meta_package "$flavour")
  if ! hil_apt_resolve "$meta"; then
    hil_apt_update
    if ! hil_apt_resolve "$meta"; then
      [[ -s $stamp ]] || hil_die "apt cannot resolve $meta"
      read -r HIL_PKG HIL_VER <"$stamp"
      hil_note "apt cannot resolve $meta; using the cached $HIL_PKG $HIL_VER"
      return 0
    fi
  fi
  printf '%s %s\n' "$HIL_PKG" "$HIL_VER" >"$stamp.tmp"
  mv -f "$stamp.tmp" "$stamp"
}

# Extract the uncompressed ELF vmlinux from bzImage $1 into $2. The setup
# header gives the payload's offset (setup_sects at 0x1f1, payload_offset at
# 0x248) and length (0x24c). The payload ends with the 4-byte little-endian
# uncompressed size, which decompressors reject as trailing garbage: it is cut
# off and used to check the result.
hil_extract_vmlinux() {
  local bz=$1 out=$2 ss po pl off magic want got
  local -a unpack
  ss=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  ((ss == 0)) && ss=4
  po=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
  pl=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
  off=$(((ss + 1) * 512 + po))
  magic=$(od -An -tx1 -j "$off" -N4 "$bz" | tr -d ' \n')
  want=$(od -An -tu4 -j $((off + pl - 4)) -N4 "$bz" | tr -d ' ')
  case $magic in
    fd377a58) unpack=(xz -dc) ;;
    28b52ffd) unpack=(zstd -dcq) ;;
    1f8b*) unpack=(gzip -dc) ;;
    *) hil_die "$bz: unknown kernel payload (magic $magic)" ;;
  esac
  dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count=$((pl - 4)) bs=1M status=none |
    "${unpack[@]}" >"$out.tmp" ||
    hil_die "$bz: cannot decompress the kernel payload"
  got=$(stat -c %s "$out.tmp")
  [[ $got == "$want" && $(od -An -tx1 -N4 "$out.tmp" | tr -d ' \n') == 7f454c46 ]] ||
    hil_die "$bz: extracted vmlinux is not a complete ELF ($got of $want bytes)"
  mv -f "$out.tmp" "$out"
}

# 2. Make sure kernel package $1 version $2 is downloaded, unpacked (never
# installed), depmod'ed and its vmlinux extracted; sets HIL_KDIR. Caller holds
# the lock.
hil_prepare_kernel() {
  local pkg=$1 ver=$2 dl deb kver
  HIL_KDIR="$HIL_CACHE_DIR/kernel/${pkg}_$(hil_sanitize "$ver")"
  [[ -e $HIL_KDIR/.ready ]] && return 0
  rm -rf "$HIL_KDIR"
  dl="$HIL_KDIR/dl"
  mkdir -p "$dl"
  hil_note "downloading $pkg $ver into $HIL_KDIR"
  # The download goes to a root-only folder: tell apt not to drop to _apt.
  if ! (cd "$dl" && apt-get -qq -o APT::Sandbox::User=root download "$pkg=$ver" >&2); then
    hil_apt_update
    (cd "$dl" && apt-get -qq -o APT::Sandbox::User=root download "$pkg=$ver" >&2) ||
      hil_die "apt-get download $pkg=$ver failed"
  fi
  deb=$(find "$dl" -maxdepth 1 -name '*.deb' -print -quit)
  [[ -n $deb ]] || hil_die "apt-get download left no .deb in $dl"
  dpkg -x "$deb" "$HIL_KDIR/root" || hil_die "dpkg -x $deb failed"
  rm -rf "$dl" # the unpacked tree is all we need
  kver=$(find "$HIL_KDIR/root/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n')
  [[ -n $kver && $kver != *$'\n'* && -f $HIL_KDIR/root/boot/vmlinuz-$kver ]] ||
    hil_die "$deb has not exactly one kernel with modules"
  printf '%s\n' "$kver" >"$HIL_KDIR/kver"
  # The package ships no modules.dep.
  depmod -b "$HIL_KDIR/root" "$kver" || hil_die "depmod for $kver failed"
  hil_extract_vmlinux "$HIL_KDIR/root/boot/vmlinuz-$kver" "$HIL_KDIR/vmlinux"
  touch "$HIL_KDIR/.ready"
}

# Print the cache path of the initramfs for the kernel in $1: keyed by the
# kernel, the module list, the guest init script and busybox.
hil_initramfs_path() {
  local kdir=$1 key
  key=$({
    printf 'format %s\nkernel %s\n' "$HIL_INITRAMFS_FORMAT" "${kdir##*/}"
    printf 'module %s\n' "${HIL_MODULES[@]}"
    cat "${HIL_DIR:?}/init"
    sha256sum </bin/busybox
  } | sha256sum | cut -c1-16)
  printf '%s\n' "$HIL_CACHE_DIR/initramfs/$(cat "$kdir/kver")-$key.cpio.gz"
}

# The modules.dep path (relative to lib/modules/KVER) of module $1 ("-" and "_"
# are the same), or nothing.
hil_module_path() {
  awk -v want="${1//-/_}" -F: '{
      n = $1; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n)
      if (n == want) { print $1; exit }
    }' "$HIL_MODDIR/modules.dep"
}

# Append module path $1 (with insmod parameters $2) to HIL_ORDER, after its
# dependencies; each module once.
hil_add_module() {
  local path=$1 params=${2:-} deps dep
  [[ " ${HIL_SEEN[*]} " == *" $path "* ]] && return 0
  HIL_SEEN+=("$path")
  deps=$(awk -v p="$path:" '$1 == p { $1 = ""; print; exit }' "$HIL_MODDIR/modules.dep")
  for dep in $deps; do hil_add_module "$dep"; done
  HIL_ORDER+=("$path${params:+ $params}")
}

# 3. Build (or reuse) the initramfs for the kernel in HIL_KDIR; sets
# HIL_INITRD. Caller holds the lock.
hil_prepare_initramfs() {
  local kver stage entry name params path optional applet
  kver=$(cat "$HIL_KDIR/kver")
  HIL_INITRD=$(hil_initramfs_path "$HIL_KDIR")
  [[ -e $HIL_INITRD ]] && return 0
  mkdir -p "$HIL_CACHE_DIR/initramfs"
  rm -rf "$HIL_CACHE_DIR"/initramfs/stage.* # left by an interrupted build
  stage=$(mktemp -d "$HIL_CACHE_DIR/initramfs/stage.XXXXXX")
  HIL_MODDIR="$HIL_KDIR/root/lib/modules/$kver"
  HIL_SEEN=()
  HIL_ORDER=()
  for entry in "${HIL_MODULES[@]}"; do
    name=${entry%% *}
    params=
    [[ $entry == *" "* ]] && params=${entry#* }
    optional=0
    [[ $name == \?* ]] && optional=1 && name=${name#\?}
    path=$(hil_module_path "$name")
    if [[ -z $path ]]; then
      grep -Eq "/${name//[-_]/[-_]}\.ko(\.[a-z]+)?\$" "$HIL_MODDIR/modules.builtin" && continue
      ((optional)) && continue
      rm -rf "$stage"
      hil_die "module $name is neither in $kver's modules.dep nor built in"
    fi
    hil_add_module "$path" "$params"
  done

  # Layout: busybox and its applet links, /init, the modules uncompressed (as
  # busybox insmod wants them) with kmod's index files (the kernel's
  # request_module runs the initramfs' busybox /sbin/modprobe; the guest /init
  # also overlays this lib/modules onto the host's /usr/lib, so that kmod's
  # modprobe and lspci -k work inside the chroot), the ordered load list.
  mkdir -p "$stage"/{bin,proc,sys,dev,root-host,hil-out,hil-project,etc/hil,tmp} \
    "$stage/lib/modules/$kver"
  cp /bin/busybox "$stage/bin/busybox"
  for applet in $(busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
  done
  ln -s bin "$stage/sbin"
  install -m 0755 "${HIL_DIR:?}/init" "$stage/init"
  printf '%s\n' "$kver" >"$stage/etc/hil/kver"
  : >"$stage/etc/hil/modules.list"
  for entry in "${HIL_ORDER[@]}"; do
    path=${entry%% *}
    params=
    [[ $entry == *" "* ]] && params=${entry#* }
    mkdir -p "$stage/lib/modules/$kver/${path%/*}"
    case $path in
      *.ko.xz) xz -dc "$HIL_MODDIR/$path" >"$stage/lib/modules/$kver/${path%.xz}" ;;
      *.ko.zst) zstd -dcq "$HIL_MODDIR/$path" >"$stage/lib/modules/$kver/${path%.zst}" ;;
      *.ko.gz) gzip -dc "$HIL_MODDIR/$path" >"$stage/lib/modules/$kver/${path%.gz}" ;;
      *) cp "$HIL_MODDIR/$path" "$stage/lib/modules/$kver/$path" ;;
    esac
    printf '%s%s\n' "${path%.ko*}.ko" "${params:+ $params}" >>"$stage/etc/hil/modules.list"
  done
  cp "$HIL_MODDIR"/modules.{builtin,builtin.modinfo,order} "$stage/lib/modules/$kver/"
  depmod -b "$stage" "$kver" || hil_die "depmod of the initramfs modules failed"
  (cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$HIL_INITRD.tmp" ||
    hil_die "packing the initramfs failed"
  mv -f "$HIL_INITRD.tmp" "$HIL_INITRD"
  rm -rf "$stage"
  hil_note "built $HIL_INITRD (${#HIL_ORDER[@]} modules)"
}

# Prepare kernel + initramfs for flavour $1 (6.1 or 6.12); sets HIL_VMLINUX,
# HIL_INITRD and HIL_KVER. The fast path (all cached, apt lists unchanged)
# takes no lock and runs no apt; otherwise the work is done under the lock.
hil_prepare() {
  local flavour=$1 ready=0
  hil_meta_package "$flavour" >/dev/null || hil_die "unknown kernel '$flavour' (use 6.1 or 6.12)"
  mkdir -p "$HIL_CACHE_DIR"
  if hil_resolution_fresh "$flavour"; then
    read -r HIL_PKG HIL_VER <"$HIL_CACHE_DIR/resolved-$flavour"
    HIL_KDIR="$HIL_CACHE_DIR/kernel/${HIL_PKG}_$(hil_sanitize "$HIL_VER")"
    if [[ -e $HIL_KDIR/.ready ]]; then
      HIL_INITRD=$(hil_initramfs_path "$HIL_KDIR")
      [[ -e $HIL_INITRD ]] && ready=1
    fi
  fi
  if ((!ready)); then
    hil_lock
    hil_resolve_kernel "$flavour"
    hil_prepare_kernel "$HIL_PKG" "$HIL_VER"
    hil_prepare_initramfs
    hil_unlock
  fi
  HIL_VMLINUX="$HIL_KDIR/vmlinux"
  HIL_KVER=$(cat "$HIL_KDIR/kver")
}
