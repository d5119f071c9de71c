#!/usr/bin/env bash
# Builds real Linux guest RAM images for `densevm bench merge --image-pair A B` and
# `--image-clones A`, from Debian packages only:
#
#   OUT/guest/                 the Debian cloud kernel and a busybox initramfs, built by
#                              resources/linux/build-guest.sh (reused as is)
#   OUT/images-initramfs.cpio.gz that initramfs with some Debian package files added
#                              (unpacked under /debian, see PACKAGES) and an /init that reads
#                              every file (cat and md5sum) so that the guest's page
#                              cache and heap hold real data, then prints
#                              DENSEVM-IMAGE-READY on the serial console and idles
#   OUT/image-a.ram, image-b.ram the guest's whole RAM (IMAGE_MIB, default 256 MiB;
#                              byte offset = guest-physical address) after two
#                              independent boots under QEMU with software emulation
#                              (-accel tcg) and a file-backed RAM, each killed once the
#                              marker appeared (different boots place the page cache
#                              differently)
#   OUT/image-a.log, ...       the serial console of each boot
#
# Needs root for apt-get (qemu-system-x86 is installed if missing) or the tools already
# installed. No network except the Debian archive through apt-get.
# Idempotent: every step whose output exists is skipped (FORCE=1 redoes the images).
#
# Usage: resources/images/build-ram-images.sh [OUT_DIR]   (default resources/images/out)
# Environment: IMAGE_MIB (RAM size, default 256), BOOT_TIMEOUT (seconds per boot,
#   default 1800), PACKAGES (Debian packages whose files the guest reads), FORCE.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
mib="${IMAGE_MIB:-256}"
boot_timeout="${BOOT_TIMEOUT:-1800}"
packages="${PACKAGES:-libc6 coreutils perl-base libssl3 python3.11-minimal libpython3.11-minimal libstdc++6}"
marker="DENSEVM-IMAGE-READY"

log() { echo "build-ram-images: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$mib" in ''|*[!0-9]*) die "IMAGE_MIB must be a number of MiB, not '$mib'";; esac
[ "$mib" -ge 64 ] || die "IMAGE_MIB must be at least 64 (the guest unpacks its initramfs into RAM)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
started=$(date +%s)

# 1. The kernel and the busybox initramfs (build-guest.sh is idempotent itself).
"$here/../linux/build-guest.sh" "$out/guest"

# 2. QEMU.
if ! command -v qemu-system-x86_64 >/dev/null; then
    [ "$(id -u)" = 0 ] || die "qemu-system-x86_64 is missing and not root to apt-get install qemu-system-x86"
    log "installing qemu-system-x86"
    apt-cache show qemu-system-x86 >/dev/null 2>&1 || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null \
        || die "apt-get install qemu-system-x86 failed"
fi
for tool in qemu-system-x86_64 cpio gzip dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done

# 3. The image initramfs: build-guest.sh's (busybox, its modules) plus package files
#    and our /init.
initramfs="$out/images-initramfs.cpio.gz"
if [ ! -s "$initramfs" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # apt-get download runs as _apt: let it write here.
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
    mkdir -p "$work/root" "$work/debs"
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
    (cd "$work/root" && gzip -dc "$out/guest/initramfs.cpio.gz" | cpio -id --quiet) \
        || die "unpacking $out/guest/initramfs.cpio.gz"
    log "downloading $packages"
    # shellcheck disable=SC2086 # a list of package names
    (cd "$work/debs" && apt-get download -qq $packages) || die "apt-get download $packages failed"
    # Under /debian, so that the packages' own /bin and /lib do not replace busybox's.
    mkdir -p "$work/root/debian"
    for deb in "$work"/debs/*.deb; do
        dpkg-deb -x "$deb" "$work/root/debian" || die "unpacking $deb"
    done
    rm -f "$work/root/init"
    cat > "$work/root/init" <<EOF
#!/bin/busybox sh
# densevm RAM-image guest: read real files, then idle so that the RAM can be saved.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1
for m in virtio virtio_ring virtio_mmio virtio_balloon; do
    [ -e /lib/modules/\$m.ko ] && insmod /lib/modules/\$m.ko 2>/dev/null
done
echo "reading files"
find /debian -type f 2>/dev/null > /tmp/files
n=\$(wc -l < /tmp/files)
while read -r f; do cat "\$f" > /dev/null; done < /tmp/files
# A second pass that also computes something (heap, slab and a real output file).
while read -r f; do md5sum "\$f"; done < /tmp/files > /tmp/md5sums
mkdir -p /tmp/copy && cp -a /debian/usr/share /tmp/copy/ 2>/dev/null
sync
echo "files read: \$n; \$(head -n2 /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
echo "$marker"
while :; do sleep 3600; done
EOF
    chmod 755 "$work/root/init"
    log "packing $initramfs ($(du -sh "$work/root" | cut -f1) unpacked)"
    (cd "$work/root" && find . -print0 | cpio --null -o -H newc --owner 0:0 --quiet) \
        | gzip -6 > "$initramfs.tmp"
    mv "$initramfs.tmp" "$initramfs"
    rm -rf "$work"
    trap - EXIT
fi

# 4. Two independent boots.
boot() { # name
    local name="$1" ram="$out/image-$1.ram" serial="$out/image-$1.log"
    if [ -z "${FORCE:-}" ] && [ -s "$ram" ]; then
        log "image $name exists: $ram (FORCE=1 to rebuild)"
        return
    fi
    rm -f "$ram" "$ram.partial" "$serial"
    : > "$serial"
    local t0 pid elapsed=0
    t0=$(date +%s)
    log "booting image $name under QEMU TCG (${mib} MiB, timeout ${boot_timeout} s)"
    qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m "${mib}M" \
        -object "memory-backend-file,id=m,size=${mib}M,mem-path=$ram.partial,share=on" \
        -machine "pc,memory-backend=m" \
        -kernel "$out/guest/bzImage" -initrd "$initramfs" \
        -append "console=ttyS0 quiet panic=-1" \
        -display none -monitor none -serial "file:$serial" -no-reboot &
    pid=$!
    while ! grep -q "$marker" "$serial" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" || true
            tail -n 20 "$serial" >&2 || true
            die "QEMU exited before the guest printed $marker (console: $serial)"
        fi
        elapsed=$(( $(date +%s) - t0 ))
        if [ "$elapsed" -ge "$boot_timeout" ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            tail -n 20 "$serial" >&2 || true
            die "image $name: no $marker within ${boot_timeout} s (BOOT_TIMEOUT; console: $serial)"
        fi
        sleep 1
    done
    # The guest idles now; its RAM file holds what it wrote (a shared mapping).
    sleep 2
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local size
    size=$(stat -c %s "$ram.partial")
    [ "$size" = $((mib * 1048576)) ] || die "image $name is $size bytes, expected $((mib * 1048576))"
    mv "$ram.partial" "$ram"
    log "image $name: $(( $(date +%s) - t0 )) s to boot and read the files"
}
boot a
boot b

for name in a b; do
    f="$out/image-$name.ram"
    log "$f: $(stat -c %s "$f") bytes, $(du -k "$f" | cut -f1) KiB allocated on disk"
done
log "done in $(( $(date +%s) - started )) s"
