#!/usr/bin/env bash
# The vm driver's host side and guest: installs QEMU and the tools the guest is built with,
# then makes the guest every sandbox VM boots, in ${SANDBOXCTL_VM_GUEST:-<repo>/.cache/vm}:
#
#   vmlinux         Debian's cloud kernel, uncompressed (an ELF with a PVH note: -M microvm boots it
#                   directly, faster than the bzImage). Only Debian's mirror is used, via apt-get download.
#   initramfs.cpio  an UNCOMPRESSED newc cpio (TCG would spend longer gunzipping it than QEMU spends
#                   loading 3 MB): busybox-static, the virtio/overlay/button modules of that same kernel,
#                   and the guest init and exec agent written below.
#   VERSION         "kernel=<version> init=<sha256 of the guest files>": a rerun with the same kernel and
#                   the same guest files does nothing; a changed init rebuilds the initramfs.
#
# Idempotent: installs only what is missing (apt-get update at most once), rebuilds only what changed.
# Runs as root on Debian 12. The guest side of the protocol (kernel command line, markers, exec agent)
# is documented in drivers/vm/machine.py, which is the host side.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${SANDBOXCTL_VM_GUEST:-$REPO/.cache/vm}
# The modules the guest loads (their dependencies are added, builtins skipped), in this order.
MODULES=(virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
  virtio_console ext4 overlay evdev button)

log() { echo "setup-vm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- host packages ----------------------------------------------------------------------------
updated=
apt_update() { [ -n "$updated" ] || { apt-get update -qq; updated=1; }; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || missing+=(e2fsprogs)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
command -v lz4 >/dev/null || missing+=(lz4)
command -v modinfo >/dev/null || missing+=(kmod)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX is missing although busybox-static is installed"

# --- which kernel -----------------------------------------------------------------------------
kernel_package() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-.*-cloud-amd64\)$/\1/p' | head -1
}
PKG=$(kernel_package)
if [ -z "$PKG" ]; then
  apt_update
  PKG=$(kernel_package)
fi
[ -n "$PKG" ] || die "apt knows no linux-image-cloud-amd64 (is this Debian 12 amd64?)"
KVER=${PKG#linux-image-}

# --- the guest files: written to a staging directory first, so their hash decides a rebuild ---
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
G=$STAGE/guest
mkdir -p "$G/bin" "$G/lib" "$G/sbctl" "$G/etc/acpi/PWRF"

# Shared by /init and the agents: the kernel command line's sandboxctl.* keys, and the shutdown.
cat >"$G/lib/sandboxctl.sh" <<'EOF'
# sandboxctl guest library, sourced by /init and /bin/sandboxctl-agent (busybox sh).
SBX_RUN=/run/sandboxctl
SBX_BOOT= SBX_CMD= SBX_ENV= SBX_TERM=3 SBX_CONSOLES=4
set -f
for w in $(cat /proc/cmdline); do
  case $w in
  sandboxctl.boot=*) SBX_BOOT=${w#*=} ;;
  sandboxctl.cmd=*) SBX_CMD=${w#*=} ;;
  sandboxctl.env=*) SBX_ENV=${w#*=} ;;
  sandboxctl.term=*) SBX_TERM=${w#*=} ;;
  sandboxctl.consoles=*) SBX_CONSOLES=${w#*=} ;;
  esac
done
set +f
EOF

# sandboxctl-run ENV ARGV: exec ARGV chrooted in /newroot, cwd /workspace, with exactly the
# environment ENV. Both are comma lists of '_' + base64 items (the '_' keeps an empty item a field).
cat >"$G/bin/sandboxctl-run" <<'EOF'
#!/bin/sh
set -f
envf=$1 argvf=$2
set --
IFS=,
for x in $envf; do v=$(printf %s "${x#_}" | base64 -d; echo .); set -- "$@" "${v%.}"; done
set -- "$@" /.sandboxctl/busybox sh /.sandboxctl/launch
for x in $argvf; do v=$(printf %s "${x#_}" | base64 -d; echo .); set -- "$@" "${v%.}"; done
unset IFS
exec chroot /newroot /.sandboxctl/busybox env -i "$@"
EOF

# Inside the sandbox root: cd /workspace, then exec the command found on the sandbox's PATH (never a
# busybox applet of the same name: this busybox prefers its applets to the image's programs).
cat >"$G/sbctl/launch" <<'EOF'
cd /workspace 2>/dev/null || cd /
# Descriptor 7 is open for the main command only: a byte on it tells /init the command is about
# to run (its ready marker waits for that); the command itself never holds it.
{ printf . >&7; exec 7>&-; } 2>/dev/null
[ $# -gt 0 ] || exit 0
case $1 in */*) exec "$@" ;; esac
name=$1
shift
IFS=:
for d in ${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}; do
  [ -n "$d" ] || d=.
  if [ -f "$d/$name" ] && [ -x "$d/$name" ]; then unset IFS; exec -a "$name" "$d/$name" "$@"; fi
done
echo "sandboxctl: $name: command not found" >&2
exit 127
EOF

# The exec agent on one virtio console (protocol: drivers/vm/machine.py).
cat >"$G/bin/sandboxctl-agent" <<'EOF'
#!/bin/sh
. /lib/sandboxctl.sh
tty=$1
exec 2>/dev/null
# No such console (QEMU was given fewer): exit 1, and the caller stops restarting this agent.
{ exec <"$tty" >"$tty"; } || exit 1
stty raw -echo
: >"$SBX_RUN/listening.${tty##*/}"  # what /init waits for before it says ready
last=
while :; do
  IFS= read -r line || { sleep 0.2; continue; }
  set -f
  set -- $line
  set +f
  [ $# -ge 2 ] || continue
  kind=$1 tok=$2
  case $kind in
  X)
    [ "$tok" != "$last" ] || continue  # a resent request already being (or been) run
    [ $# -ge 4 ] || { printf '%s bad\n' "$tok"; continue; }
    last=$tok
    argvf=$3 stdinf=$4
    printf '%s ack\n' "$tok"
    in=/dev/null
    if [ "$stdinf" != - ]; then in=$SBX_RUN/$tok.in; printf %s "${stdinf#_}" | base64 -d >"$in"; fi
    out=$SBX_RUN/$tok.out
    mkfifo "$out"
    cat "$out" &
    catpid=$!
    setsid sandboxctl-run "$SBX_ENV" "$argvf" <"$in" >"$out" 2>&1 &
    pid=$!
    echo "$pid" >"$SBX_RUN/$tok.pid"
    wait "$pid"
    code=$?
    # The output ends when the command's last writer closes it; a daemon it left behind holding
    # the pipe gets a second, then its output is cut off.
    i=0
    while kill -0 "$catpid" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.05; i=$((i + 1)); done
    kill "$catpid" 2>/dev/null
    wait "$catpid"
    rm -f "$SBX_RUN/$tok.in" "$out" "$SBX_RUN/$tok.pid"
    printf '\036%s %d\n' "$tok" "$code"
    ;;
  I)
    # An interactive session (sandboxctl shell): the command gets this console as its terminal,
    # cooked, with echo and signals, as its controlling tty; the host relays the user's terminal.
    [ "$tok" != "$last" ] || continue
    [ $# -ge 5 ] || { printf '%s bad\n' "$tok"; continue; }
    last=$tok
    argvf=$3 rows=$4 cols=$5
    printf '%s ack\n' "$tok"
    stty sane
    if [ "$rows" = 0 ]; then stty -echo; else stty rows "$rows" cols "$cols" 2>/dev/null; fi
    setsid -c sandboxctl-run "$SBX_ENV,$(printf TERM=xterm | base64 | sed 's/^/_/')" "$argvf" <"$tty" >"$tty" 2>&1 &
    pid=$!
    echo "$pid" >"$SBX_RUN/$tok.pid"
    wait "$pid"
    code=$?
    # The session's end hung the console up for every file open on it, this agent's too: it opens
    # the console anew before it says how the command ended.
    exec <"$tty" >"$tty"
    stty raw -echo
    rm -f "$SBX_RUN/$tok.pid"
    printf '\036%s %d\n' "$tok" "$code"
    ;;
  K)
    pid=$(cat "$SBX_RUN/$tok.pid" 2>/dev/null) && kill -KILL -"$pid" 2>/dev/null
    printf '%s killed\n' "$tok"
    ;;
  esac
done
EOF

cat >"$G/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
kill -USR1 1
EOF

cat >"$G/init" <<'EOF'
#!/bin/sh
# sandboxctl guest init (PID 1). Protocol and markers: drivers/vm/machine.py.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/null >/dev/console 2>&1
stty raw -echo </dev/console
. /lib/sandboxctl.sh
mkdir -p "$SBX_RUN" /var/log

fail() {
  echo "sandboxctl-fail $*"
  sync
  poweroff -f
}

while read -r m; do insmod "/lib/modules/$m.ko" || echo "sandboxctl: insmod $m failed"; done </lib/modules/order

# The disks, by label: the image's root (read-only), the sandbox's layer and its workspace.
i=0
until R=$(findfs LABEL=root) && L=$(findfs LABEL=layer) && W=$(findfs LABEL=workspace); do
  i=$((i + 1))
  [ $i -lt 100 ] || fail "disks labelled root, layer and workspace not all found"
  sleep 0.1
done 2>/dev/null
mount -t ext4 -o ro "$R" /lower || mount -t ext4 -o ro,noload "$R" /lower || fail "cannot mount the root disk"
mount -t ext4 "$L" /layer || fail "cannot mount the layer disk"
mkdir -p /layer/upper /layer/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/layer/upper,workdir=/layer/work /newroot ||
  fail "cannot mount the overlay"
mkdir -p /newroot/workspace /newroot/proc /newroot/sys /newroot/dev /newroot/.sandboxctl
mount -t ext4 "$W" /newroot/workspace || fail "cannot mount the workspace disk"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
ln /bin/busybox /sbctl/busybox
mount --bind /sbctl /newroot/.sandboxctl && mount -o remount,bind,ro /newroot/.sandboxctl

others() {  # is any process other than this init still alive?
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" != 1 ] && readlink "$p/exe" >/dev/null 2>&1 && return 0
  done
  return 1
}
stopping=
shutdown() {
  [ -z "$stopping" ] || return
  stopping=1
  trap '' USR1 TERM
  kill -TERM -1 2>/dev/null
  i=0
  while others && [ $i -lt $((SBX_TERM * 10)) ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL -1 2>/dev/null
  i=0
  while others && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  sync
  umount /newroot/workspace || mount -o remount,ro /newroot/workspace || echo "sandboxctl: workspace busy"
  umount /newroot/.sandboxctl /newroot/dev /newroot/sys /newroot/proc /newroot 2>/dev/null
  umount /layer || mount -o remount,ro /layer
  umount /lower
  sync
  poweroff -f
}
trap shutdown USR1 TERM

acpid -c /etc/acpi -l /run/acpid.log
# One exec agent per virtio console the host gave (sandboxctl.consoles), each /dev/hvcN.
case $SBX_CONSOLES in '' | *[!0-9]* | 0*) SBX_CONSOLES=4 ;; esac
n=0
while [ $n -lt "$SBX_CONSOLES" ]; do
  setsid sh -c "while sandboxctl-agent /dev/hvc$n; do sleep 0.2; done" &
  n=$((n + 1))
done
listening() {
  n=0
  while [ $n -lt "$SBX_CONSOLES" ]; do
    [ -e "$SBX_RUN/listening.hvc$n" ] || return 1
    n=$((n + 1))
  done
}
if [ -n "$SBX_CMD" ]; then
  mkfifo "$SBX_RUN/main.out" "$SBX_RUN/main.gate"
  # The command's output is passed to the console only once the ready marker is out, so nothing
  # it prints comes before the marker or passes for a line of the guest's own (it waits in the
  # pipe meanwhile). Init holds the gate open (fd 8), so the word it writes there is never lost.
  exec 8<>"$SBX_RUN/main.gate"
  { read -r _ <"$SBX_RUN/main.gate"; exec cat; } <"$SBX_RUN/main.out" 8>&- &
  catpid=$!
  : >"$SBX_RUN/main.started"
  setsid sandboxctl-run "$SBX_ENV" "$SBX_CMD" </dev/null >"$SBX_RUN/main.out" 2>&1 7>>"$SBX_RUN/main.started" 8>&- &
  cmdpid=$!
fi
# Ready once the exec agents listen and the command is launched (as a container engine's start
# returns once the container's process runs): the work of starting them is the boot's, and a
# host that hears "ready" finds the guest settled, an exec answered at once. At most 10 s.
i=0
until { [ -z "$SBX_CMD" ] || [ -s "$SBX_RUN/main.started" ] || ! kill -0 "$cmdpid" 2>/dev/null; } && listening; do
  i=$((i + 1))
  [ $i -lt 500 ] || break
  sleep 0.02
done
echo "sandboxctl-ready $SBX_BOOT"

if [ -n "$SBX_CMD" ]; then
  echo go >&8
  exec 8>&-
  wait "$cmdpid"
  code=$?
  i=0
  while kill -0 "$catpid" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.05; i=$((i + 1)); done
  echo "sandboxctl-exit $code"
  shutdown
fi
while :; do
  sleep 3600 &
  wait $!
done
EOF
chmod 0755 "$G/init" "$G/bin/sandboxctl-run" "$G/bin/sandboxctl-agent" "$G/etc/acpi/PWRF/00000080"
HASH=$( (cd "$G" && find . -type f | LC_ALL=C sort | xargs sha256sum; echo "${MODULES[*]}") | sha256sum | cut -c1-16)
WANT="kernel=$KVER init=$HASH"

if [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio" ] && [ "$(cat "$OUT/VERSION" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
log "building the guest ($WANT) in $OUT"
mkdir -p "$OUT"

# --- the kernel package, from Debian's mirror only ------------------------------------------
K=$STAGE/kernel
mkdir -p "$K"
(cd "$STAGE" && apt-get download -qq -o APT::Sandbox::User=root "$PKG" >/dev/null) ||
  { apt_update && (cd "$STAGE" && apt-get download -qq -o APT::Sandbox::User=root "$PKG" >/dev/null); }
dpkg-deb -x "$STAGE"/"$PKG"_*.deb "$K"
VMLINUZ=$K/boot/vmlinuz-$KVER
MODDIR=$K/lib/modules/$KVER
[ -f "$VMLINUZ" ] && [ -d "$MODDIR" ] || die "$PKG has no $VMLINUZ or $MODDIR"

# vmlinuz is a bzImage: the compressed vmlinux sits at (setup_sects + 1) * 512 + payload_offset.
if [ ! -f "$OUT/vmlinux" ] || [ "$(sed -n 's/^kernel=\([^ ]*\) .*/\1/p' "$OUT/VERSION" 2>/dev/null)" != "$KVER" ]; then
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$VMLINUZ" | tr -d ' ')
  read -r payload_offset payload_length < <(od -An -tu4 -j $((0x248)) -N8 "$VMLINUZ")
  start=$(((setup_sects + 1) * 512 + payload_offset))
  dd if="$VMLINUZ" of="$STAGE/payload" bs=64K iflag=skip_bytes,count_bytes skip=$start count="$payload_length" status=none
  magic=$(od -An -tx1 -N4 "$STAGE/payload" | tr -d ' ')
  # The decompressors may complain about padding after the stream; the ELF check below judges.
  case $magic in
  02214c18) lz4 -dc "$STAGE/payload" >"$STAGE/vmlinux" 2>/dev/null || true ;;
  1f8b*) gzip -dc "$STAGE/payload" >"$STAGE/vmlinux" 2>/dev/null || true ;;
  fd377a58) xz -dc "$STAGE/payload" >"$STAGE/vmlinux" 2>/dev/null || true ;;
  *) die "unknown kernel compression (magic $magic) in $VMLINUZ" ;;
  esac
  [ "$(od -An -tx1 -N4 "$STAGE/vmlinux" | tr -d ' ')" = 7f454c46 ] || die "extracting vmlinux from $VMLINUZ failed"
  grep -qa 'Xen' "$STAGE/vmlinux" || die "$VMLINUZ has no PVH (Xen) note: microvm cannot boot it"
  mv "$STAGE/vmlinux" "$OUT/vmlinux.new"
  mv "$OUT/vmlinux.new" "$OUT/vmlinux"
fi

# --- the initramfs ----------------------------------------------------------------------------
R=$STAGE/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,lower,layer,newroot,lib/modules}
cp -a "$G"/. "$R"/
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

declare -A kofile=() done_=()
while IFS= read -r f; do
  n=$(basename "$f")
  n=${n%%.ko*}
  kofile[${n//-/_}]=$f
done < <(find "$MODDIR" -name '*.ko*')
builtin_() { sed 's|.*/||; s|\.ko$||; s|-|_|g' "$MODDIR/modules.builtin" | grep -qx "$1"; }
ORDER=()
resolve() {
  local n=${1//-/_} d
  [ -z "${done_[$n]:-}" ] || return 0
  done_[$n]=1
  builtin_ "$n" && return 0
  local f=${kofile[$n]:-}
  [ -n "$f" ] || die "module $n is neither built into $KVER nor shipped with it"
  for d in $(modinfo -F depends "$f" | tr , ' '); do resolve "$d"; done
  case $f in
  *.ko) cp "$f" "$R/lib/modules/$n.ko" ;;
  *.ko.xz) xz -dc "$f" >"$R/lib/modules/$n.ko" ;;
  *.ko.zst) zstd -qdc "$f" >"$R/lib/modules/$n.ko" ;;
  *) die "cannot unpack $f" ;;
  esac
  ORDER+=("$n")
}
for m in "${MODULES[@]}"; do resolve "$m"; done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/order"

(cd "$R" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) >"$OUT/initramfs.cpio.new"
mv "$OUT/initramfs.cpio.new" "$OUT/initramfs.cpio"
echo "$WANT" >"$OUT/VERSION"
log "done: $OUT/vmlinux, $OUT/initramfs.cpio (modules: ${ORDER[*]})"
