#!/usr/bin/env bash
# Builds the VM image for the sdcam end-to-end test from Debian packages only:
#   $CACHE/vmlinuz            the Debian 12 kernel (linux-image-amd64, unpacked, not installed)
#   $CACHE/initramfs.cpio     busybox + vivid/v4l2loopback/9p modules + ffmpeg/v4l2-ctl closure
#   (the cpio is left uncompressed: ~250 MB, mostly ffmpeg's libraries; unpacking it is a copy,
#   while gunzip under TCG costs seconds.)
# Nothing is written into the repository. Re-running is cheap (cached).
# Env: SDCAM_VM_CACHE (default ~/.cache/sdcam-vm), SDCAM_VM_REBUILD=1 to force the initramfs.
set -euo pipefail
CACHE=${SDCAM_VM_CACHE:-$HOME/.cache/sdcam-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$CACHE"
log() { printf '[build-image] %s\n' "$*" >&2; }

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
need_pkgs=()
for p in qemu-system-x86 ffmpeg v4l-utils busybox-static cpio kmod xz-utils zstd linux-headers-amd64 make gcc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing host packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

# The kernel version the headers are for (linux-headers-amd64 -> linux-headers-6.1.0-N-amd64).
KVER=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | sed -E 's/.*linux-headers-([^ ,]+).*/\1/')
log "kernel $KVER"
KROOT=$CACHE/kernel-$KVER
if [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
  log "fetching linux-image-$KVER"
  rm -rf "$KROOT" "$CACHE/debs"; mkdir -p "$CACHE/debs" "$KROOT"
  (cd "$CACHE/debs" && apt-get download "linux-image-$KVER" v4l2loopback-dkms >&2)
  for d in "$CACHE"/debs/*.deb; do dpkg-deb -x "$d" "$KROOT"; done
fi
cp "$KROOT/boot/vmlinuz-$KVER" "$CACHE/vmlinuz"

# v4l2loopback from the Debian dkms source package, built against the installed headers.
LBKO=$CACHE/v4l2loopback-$KVER.ko
if [ ! -f "$LBKO" ]; then
  src=$(ls -d "$KROOT"/usr/src/v4l2loopback-* | head -1)
  log "building $(basename "$src") for $KVER"
  rm -rf "$CACHE/lb-build"; cp -a "$src" "$CACHE/lb-build"
  make -s -C "/usr/src/linux-headers-$KVER" M="$CACHE/lb-build" modules >&2
  cp "$CACHE/lb-build/v4l2loopback.ko" "$LBKO"
fi

INITRD=$CACHE/initramfs.cpio
STAMP="$KVER $(sha256sum "$HERE/init" "$0" | sha256sum | cut -c1-16)"
if [ -f "$INITRD" ] && [ "$(cat "$CACHE/initramfs.stamp" 2>/dev/null)" = "$STAMP" ] && [ -z "${SDCAM_VM_REBUILD:-}" ]; then
  log "initramfs up to date"; echo "$CACHE"; exit 0
fi
log "assembling initramfs"
R=$CACHE/root
rm -rf "$R"; mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,mnt/host,mnt/out,etc,lib/modules/$KVER/extra}
cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done

# Modules: dependency closure of what the test loads, uncompressed, loaded with insmod in order.
MODROOT=$KROOT/lib/modules/$KVER
: > "$R/etc/modorder"
add_mod_closure() {
  modprobe -d "$KROOT" -S "$KVER" --show-depends "$1" | awk '$1=="insmod"{print $2}' | while read -r f; do
    rel=${f#"$KROOT"}; name=$(basename "$rel"); name=${name%.xz}; name=${name%.zst}; name=${name%.ko}
    grep -qx "$name" "$R/etc/modorder" && continue
    case "$f" in
      *.xz) xz -dc "$f" > "$R/lib/modules/$KVER/extra/$name.ko" ;;
      *.zst) zstd -qdc "$f" > "$R/lib/modules/$KVER/extra/$name.ko" ;;
      *) cp "$f" "$R/lib/modules/$KVER/extra/$name.ko" ;;
    esac
    echo "$name" >> "$R/etc/modorder"
  done
}
# depmod needs modules.dep in the unpacked tree
[ -f "$MODROOT/modules.dep" ] || depmod -b "$KROOT" "$KVER"
for m in virtio_pci virtio_blk 9pnet_virtio 9p videodev vivid; do add_mod_closure "$m"; done
cp "$LBKO" "$R/lib/modules/$KVER/extra/v4l2loopback.ko"; echo v4l2loopback >> "$R/etc/modorder"
log "modules: $(tr '\n' ' ' < "$R/etc/modorder")"

# ffmpeg, ffprobe, v4l2-ctl and their shared-library closure; the sdcam binary comes over 9p
# and only needs glibc/libgcc, which are in this closure.
copy_with_libs() {
  for b in "$@"; do
    install -D "$b" "$R$b"
    ldd "$b" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}' | while read -r l; do
      if [ -n "$l" ] && [ -e "$l" ] && [ ! -e "$R$l" ]; then install -D "$(readlink -f "$l")" "$R$l"; fi
    done
  done
}
copy_with_libs /usr/bin/ffmpeg /usr/bin/ffprobe /usr/bin/v4l2-ctl /lib/x86_64-linux-gnu/libgcc_s.so.1
# the dynamic loader at its canonical path
install -D /lib64/ld-linux-x86-64.so.2 "$R/lib64/ld-linux-x86-64.so.2"
mkdir -p "$R/usr/lib" "$R/lib/x86_64-linux-gnu"
cp "$HERE/init" "$R/init"; chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet > "$INITRD")
echo "$STAMP" > "$CACHE/initramfs.stamp"
log "initramfs $(du -h "$INITRD" | cut -f1)"
echo "$CACHE"
