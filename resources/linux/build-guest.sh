#!/usr/bin/env bash
# Builds a real Linux guest for densevm from Debian packages only:
#   out/bzImage          the Debian cloud kernel (linux-image-*-cloud-amd64), a bzImage
#   out/initramfs.cpio.gz a busybox (busybox-static) initramfs whose /init prints
#                        DENSEVM-GUEST-READY on the console, lists the virtio devices
#                        and powers off
#   out/config           the kernel's /boot/config-* (checked for what densevm needs)
#   out/kernel-version   the kernel release string
#   out/vmlinux          the same kernel uncompressed (ELF, entered at its 64-bit
#                        entry by densevm: no decompressor to run, which matters where
#                        guest-kernel code is emulated); only when the tool of the
#                        kernel's compression (lz4, xz, zstd or gzip) is installed
#   out/initramfs.cpio   the initramfs uncompressed (no gunzip in the guest kernel)
#   out/System.map       only with DENSEVM_SYSTEM_MAP=1: the kernel's symbol table, for
#                        `densevm run --system-map` (names the kernel function at the RIP
#                        of an exit densevm cannot handle). The image package's
#                        System.map is a stub: the real one is taken from
#                        linux-image-<version>-dbg, a ~280 MB download.
#
# Needs: apt-get (with Debian's package lists), dpkg-deb, cpio, gzip; lz4 for out/vmlinux.
# No network except the Debian archive through apt-get.
# Idempotent: does nothing if out/ already holds a complete build (FORCE=1 rebuilds);
# with DENSEVM_SYSTEM_MAP=1 and a complete build without System.map, fetches only it.
#
# Usage: resources/linux/build-guest.sh [OUT_DIR]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
# Absolute: the build below runs in a temporary directory.
mkdir -p "$out" && out="$(cd "$out" && pwd)"
marker="DENSEVM-GUEST-READY"
# Revision of the initramfs's /init: an out/ built with another one is rebuilt.
# 2: resets instead of powering off where the kernel has no ACPI.
# 3: loads the modules in the order their `depends=` give.
init_rev=3
# The kernel flavour. "cloud" is the smallest Debian kernel built for VMs; it has
# virtio-mmio, virtio-balloon and the 8250 serial console built in (checked below).
flavour="${DENSEVM_KERNEL_FLAVOUR:-cloud-amd64}"

log() { echo "build-guest: $*" >&2; }

# out/vmlinux from the bzImage: its payload is the compressed ELF vmlinux; find the
# payload's magic number and decompress from there (what the kernel's
# scripts/extract-vmlinux does). Skipped, with a note, if the tool is missing.
extract_vmlinux() {
    local bz="$1" dst="$2" config="$3" magic tool
    case "$(grep -oE '^CONFIG_KERNEL_(LZ4|XZ|ZSTD|GZIP)=y' "$config" | head -n1)" in
        CONFIG_KERNEL_LZ4=y) magic='\x02\x21\x4c\x18'; tool="lz4 -dc" ;;
        CONFIG_KERNEL_XZ=y) magic='\xfd7zXZ\x00'; tool="xz -dc" ;;
        CONFIG_KERNEL_ZSTD=y) magic='\x28\xb5\x2f\xfd'; tool="zstd -dc" ;;
        CONFIG_KERNEL_GZIP=y) magic='\x1f\x8b\x08'; tool="gzip -dc" ;;
        *) log "note: unknown kernel compression: no vmlinux"; return 0 ;;
    esac
    if ! command -v "${tool%% *}" >/dev/null; then
        log "note: ${tool%% *} not installed: no vmlinux (the bzImage boots too, slower)"
        return 0
    fi
    local off
    off="$( (LC_ALL=C grep -obUaP "$magic" "$bz" || true) | head -n1 | cut -d: -f1)" || true
    if [ -z "$off" ]; then
        log "note: no compressed payload found in $bz: no vmlinux"; return 0
    fi
    # Trailing data after the stream makes the tools complain; the ELF is whole.
    tail -c +"$((off + 1))" "$bz" | $tool > "$dst.tmp" 2>/dev/null || true
    if [ "$(head -c 4 "$dst.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
        mv "$dst.tmp" "$dst"
        log "extracted $dst"
    else
        rm -f "$dst.tmp"; log "note: decompressing $bz gave no ELF: no vmlinux"
    fi
}

# The uncompressed forms, from a complete build.
uncompressed_forms() {
    if [ ! -s "$out/initramfs.cpio" ]; then
        gzip -dc "$out/initramfs.cpio.gz" > "$out/initramfs.cpio.tmp"
        mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
    fi
    [ -s "$out/vmlinux" ] || extract_vmlinux "$out/bzImage" "$out/vmlinux" "$out/config"
}

want_map="${DENSEVM_SYSTEM_MAP:-}"
only_map=""
if [ -z "${FORCE:-}" ] && [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio.gz" ] \
    && [ -s "$out/kernel-version" ] && [ "$(cat "$out/init-rev" 2>/dev/null)" = "$init_rev" ]; then
    if [ -z "$want_map" ] || [ -s "$out/System.map" ]; then
        log "already built in $out (FORCE=1 to rebuild)"
        uncompressed_forms
        exit 0
    fi
    only_map=1
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip tar; do
    if ! command -v "$tool" >/dev/null; then
        if [ "$tool" = cpio ] && [ "$(id -u)" = 0 ]; then
            log "installing cpio"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cpio >/dev/null
        else
            log "missing tool: $tool"; exit 1
        fi
    fi
done

work="$(mktemp -d)"
# apt-get download runs as _apt: let it write here.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
trap 'rm -rf "$work"' EXIT
cd "$work"

# Package lists: apt-cache needs them (a fresh machine may have none yet).
if ! apt-cache show "linux-image-$flavour" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
    else
        log "no package list knows linux-image-$flavour and not root to apt-get update"; exit 1
    fi
fi

# out/System.map from linux-image-<kver>-dbg: only that file is unpacked.
fetch_system_map() {
    local kver="$1" dbg="linux-image-$1-dbg"
    log "downloading $dbg (for System.map)"
    apt-get download -qq "$dbg"
    dpkg-deb --fsys-tarfile "$(ls "$dbg"_*.deb | head -n1)" \
        | tar -x "./usr/lib/debug/boot/System.map-$kver"
    mkdir -p "$out"
    cp "usr/lib/debug/boot/System.map-$kver" "$out/System.map.tmp"
    mv "$out/System.map.tmp" "$out/System.map"
    log "extracted $out/System.map"
}

if [ -n "$only_map" ]; then
    fetch_system_map "$(cat "$out/kernel-version")"
    uncompressed_forms
    exit 0
fi

# The meta package depends on the real, versioned image package.
log "downloading linux-image-$flavour"
apt-get download -qq "linux-image-$flavour"
meta_deb="$(ls linux-image-"$flavour"_*.deb | head -n1)"
real_pkg="$(dpkg-deb -f "$meta_deb" Depends | tr ',' '\n' \
    | sed -E 's/^ *//; s/ .*//' | grep -E "^linux-image-[0-9].*-$flavour(-unsigned)?$" | head -n1)"
if [ -z "$real_pkg" ]; then
    log "could not find the versioned kernel package in the Depends of $meta_deb"; exit 1
fi
log "downloading $real_pkg and busybox-static"
apt-get download -qq "$real_pkg" busybox-static

mkdir -p kpkg bbpkg
dpkg-deb -x "$(ls "$real_pkg"_*.deb | head -n1)" kpkg
dpkg-deb -x "$(ls busybox-static_*.deb | head -n1)" bbpkg

vmlinuz="$(ls kpkg/boot/vmlinuz-* | head -n1)"
config="$(ls kpkg/boot/config-* | head -n1)"
kver="${vmlinuz##*/vmlinuz-}"
log "kernel $kver"

# What densevm's Linux boot needs. The console and the initramfs must be built in
# (=y). Debian builds virtio, virtio-mmio and virtio-balloon as modules (=m) in every
# flavour (cloud-amd64 and amd64 alike, checked on 6.1): those are copied into the
# initramfs and loaded by /init.
missing=()
for opt in CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE CONFIG_BLK_DEV_INITRD \
    CONFIG_RD_GZIP CONFIG_DEVTMPFS; do
    grep -qx "$opt=y" "$config" || missing+=("$opt")
done
for opt in CONFIG_VIRTIO CONFIG_VIRTIO_MMIO CONFIG_VIRTIO_BALLOON; do
    grep -qE "^$opt=(y|m)$" "$config" || missing+=("$opt")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "kernel $kver lacks: ${missing[*]}"
    log "pick another flavour with DENSEVM_KERNEL_FLAVOUR (e.g. amd64)"
    exit 1
fi
if ! grep -qx "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y" "$config"; then
    log "note: $kver has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES: virtio_mmio.device= on the"
    log "      command line is ignored; virtio-mmio devices are found only through ACPI"
    log "      (_HID LNRO0005 in the DSDT)"
fi
modules=(virtio virtio_ring virtio_mmio virtio_balloon)

# The initramfs: busybox plus /init.
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root}
cp bbpkg/bin/busybox "$root/bin/busybox"
mkdir -p "$root/lib/modules"
for m in "${modules[@]}"; do
    ko="$(find kpkg/lib/modules -name "$m.ko" | head -n1)"
    if [ -n "$ko" ]; then
        cp "$ko" "$root/lib/modules/"
    elif ! grep -qx "CONFIG_$(echo "$m" | tr a-z A-Z)=y" "$config"; then
        log "module $m.ko not found in $real_pkg"; exit 1
    fi
done
# Load order: each module after the ones its `depends=` (modinfo) names. The
# direction changes between Debian kernel builds (6.1.0-48: virtio_ring needs
# virtio; 6.1.0-57: virtio needs virtio_ring), so it is read from the modules.
load_order=()
add_module() {
    local m="$1" dep ko
    [[ " ${load_order[*]} " == *" $m "* ]] && return 0
    ko="$root/lib/modules/$m.ko"
    [ -e "$ko" ] || return 0
    for dep in $(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    load_order+=("$m")
}
for m in "${modules[@]}"; do
    add_module "$m"
done
printf '%s\n' "${load_order[@]}" > "$root/lib/modules/load-order"
log "module load order: ${load_order[*]}"
chmod 755 "$root/bin/busybox"
for applet in sh mount umount ls cat echo poweroff reboot sleep uname mkdir dmesg free insmod head; do
    ln -s busybox "$root/bin/$applet"
done
cat > "$root/init" <<EOF
#!/bin/sh
# densevm test guest init.
export PATH=/bin:/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1
# Debian builds virtio as modules: load what the initramfs carries, each after
# the modules it depends on (the order build-guest.sh read from the modules).
for m in \$(cat /lib/modules/load-order 2>/dev/null); do
    insmod /lib/modules/\$m.ko
done
echo "$marker kernel=\$(uname -r)"
echo "virtio devices:"
for d in /sys/bus/virtio/devices/*; do
    [ -e "\$d" ] || continue
    echo "  \${d##*/} device=\$(cat "\$d/device") vendor=\$(cat "\$d/vendor")"
done
echo "meminfo: \$(head -n1 /proc/meminfo)"
# densevm.hold=S on the kernel command line: stay up S more seconds (e.g. for the
# balloon driver to inflate to the host's target), then say the memory again.
for a in \$(cat /proc/cmdline); do
    case "\$a" in densevm.hold=*) sleep "\${a#*=}"; echo "meminfo: \$(head -n1 /proc/meminfo)" ;; esac
done
echo "DENSEVM-GUEST-POWEROFF"
# Without ACPI (the small microVM kernel) a power-off only halts the CPU, which the
# VMM never sees: reset instead (the kernel falls back to the i8042, whose reset
# request ends the VM). With ACPI, power off; a reset is the fallback.
[ -d /sys/firmware/acpi ] && poweroff -f
reboot -f
while :; do sleep 60; done
EOF
chmod 755 "$root/init"

mkdir -p "$out"
(cd "$root" && find . -print0 | cpio --null -o -H newc --owner 0:0 --quiet) \
    | gzip -9 > "$out/initramfs.cpio.gz.tmp"
cp "$vmlinuz" "$out/bzImage.tmp"
cp "$config" "$out/config"
echo "$kver" > "$out/kernel-version.tmp"
mv "$out/bzImage.tmp" "$out/bzImage"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
mv "$out/kernel-version.tmp" "$out/kernel-version"
echo "$init_rev" > "$out/init-rev"
rm -f "$out/initramfs.cpio" "$out/vmlinux"
uncompressed_forms
log "built $out/bzImage ($kver) and $out/initramfs.cpio.gz"
if [ -n "$want_map" ]; then
    rm -f "$out/System.map"
    fetch_system_map "$kver"
fi
