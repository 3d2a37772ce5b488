#!/bin/bash
# Builds the nested Xen lab's boot files from Debian's own packages, cached in
# $REMUS_LAB_CACHE (default /var/cache/remus-lab) and rebuilt only when the
# inputs (this script, the init scripts) change:
#   xen            Xen 4.17 hypervisor ELF (QEMU's multiboot loader takes it),
#                  built from Debian's source package with CONFIG_SHADOW_PAGING=y:
#                  Debian's own build lacks it, so a PV guest cannot enable
#                  log-dirty ("Failed to enable logdirty: 95") and cannot be
#                  migrated or protected
#   vmlinuz        Debian 12's kernel, for dom0 and for the PV guest
#   dom0.cpio.gz   Debian 12 minbase + xen-utils-4.17 + python3 and this
#                  project's dependencies, with lab/dom0-init as /init
#   guest.cpio.gz  the busybox PV guest (lab/guest-init, lab/guest-kv.cgi)
# Needs root and Debian's mirror. Prints the cache directory at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${REMUS_LAB_CACHE:-/var/cache/remus-lab}
mkdir -p "$cache"
log() { echo "[lab/build $(date +%T)] $*" >&2; }

need=()
for p in debootstrap:debootstrap qemu-system-x86_64:qemu-system-x86 busybox:busybox-static \
         cpio:cpio flex:flex bison:bison dpkg-source:dpkg-dev gcc:gcc make:make; do
    command -v "${p%%:*}" >/dev/null || need+=("${p#*:}")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi

# --- the hypervisor, with shadow paging ------------------------------------
if [ ! -s "$cache/xen" ]; then
    apt_opts=(-o "Dir::Etc::SourceList=$cache/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache")
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/src"
    # deb-src in a private apt state: the host's sources stay as they are
    printf '%s\n' "deb-src http://deb.debian.org/debian bookworm main" \
        "deb-src http://deb.debian.org/debian-security bookworm-security main" \
        > "$cache/apt/sources.list"
    apt-get "${apt_opts[@]}" update -q >&2
    cd "$cache/src"
    # The source of exactly the installed security update is not always served;
    # take the newest 4.17 source that is (4.17.5 built and ran Remus here).
    src=""
    for v in $(apt-cache "${apt_opts[@]}" showsrc xen | sed -n 's/^Version: //p' | sort -rV); do
        case $v in 4.17*) ;; *) continue ;; esac
        if apt-get "${apt_opts[@]}" source -q "xen=$v" >&2; then src=$v; break; fi
    done
    [ -n "$src" ] || { log "no Xen 4.17 source package could be fetched"; exit 1; }
    dir=$(ls -d "$cache"/src/xen-4.17*/ | head -1)
    config=$(ls /boot/xen-4.17-amd64.config 2>/dev/null || true)
    if [ -n "$config" ]; then cp "$config" "$dir/xen/.config"; else : > "$dir/xen/.config"; fi
    sed -i '/CONFIG_SHADOW_PAGING/d' "$dir/xen/.config"
    echo "CONFIG_SHADOW_PAGING=y" >> "$dir/xen/.config"
    log "building Xen $src with CONFIG_SHADOW_PAGING=y"
    make -C "$dir/xen" olddefconfig >&2
    make -C "$dir/xen" -j"$(nproc)" >&2
    grep -q '^CONFIG_SHADOW_PAGING=y' "$dir/xen/.config"
    cp "$dir/xen/xen" "$cache/xen.new" && mv "$cache/xen.new" "$cache/xen"
    echo "$src" > "$cache/xen.version"
fi

# --- dom0 root file system -------------------------------------------------
# debootstrap's own resolver does not follow virtual packages (python3-cryptography
# needs python3-cffi-backend-api-*), so it lays down minbase and apt, inside the
# chroot, installs the rest
pkgs="linux-image-amd64 xen-utils-4.17 python3 python3-pyxs python3-paramiko python3-tenacity"
pkgs+=" python3-h11 iproute2 kmod procps bridge-utils busybox iptables wget strace psmisc"
stamp=$(echo "$pkgs" | sha256sum | cut -c1-16)
if [ "$(cat "$cache/rootfs.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "debootstrap bookworm minbase, then $pkgs"
    rm -rf "$cache/rootfs.new"
    debootstrap --variant=minbase bookworm "$cache/rootfs.new" http://deb.debian.org/debian >&2
    mount --bind /proc "$cache/rootfs.new/proc"
    trap 'umount "$cache/rootfs.new/proc" 2>/dev/null || true' EXIT
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive chroot "$cache/rootfs.new" \
        apt-get install -y -q --no-install-recommends $pkgs >&2
    chroot "$cache/rootfs.new" apt-get clean
    umount "$cache/rootfs.new/proc"
    trap - EXIT
    rm -rf "$cache/rootfs"
    mv "$cache/rootfs.new" "$cache/rootfs"
    echo "$stamp" > "$cache/rootfs.stamp"
fi
root=$cache/rootfs
if grep -qs "Fake start-stop-daemon" "$root/usr/sbin/start-stop-daemon"; then
    log "$root is a half-finished debootstrap (fake start-stop-daemon): delete it and rerun"
    exit 1
fi
kver=$(ls "$root/lib/modules" | sort -V | tail -1)
cp "$root/boot/vmlinuz-$kver" "$cache/vmlinuz"

inputs=$(cat "$here/build.sh" "$here/dom0-init" "$here/guest-init" "$here/guest-kv.cgi" "$cache/rootfs.stamp" | sha256sum | cut -c1-16)
if [ "$(cat "$cache/images.stamp" 2>/dev/null)" = "$inputs" ] && [ -s "$cache/dom0.cpio.gz" ]; then
    log "images up to date in $cache"
    echo "$cache"
    exit 0
fi

# --- dom0 initramfs: the root file system minus what a dom0 in QEMU never uses
log "packing dom0 initramfs"
stage=$cache/dom0.stage
rm -rf "$stage"
mkdir -p "$stage"
tar -C "$root" --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/locale \
    --exclude=./usr/share/info --exclude=./var/cache/apt --exclude=./var/lib/apt/lists \
    --exclude=./boot --exclude=./usr/lib/firmware --exclude=./usr/lib/modules --exclude=./var/lib/initramfs-tools \
    --exclude=./usr/share/zoneinfo --exclude=./var/lib/dpkg/info -cf - . | tar -C "$stage" -xf -
# only the modules a dom0 under QEMU needs, and depmod for them
mods=lib/modules/$kver
mkdir -p "$stage/$mods/kernel"
(cd "$root/$mods" && cp modules.order modules.builtin* "$stage/$mods/" &&
 for d in kernel/drivers/xen kernel/drivers/virtio kernel/drivers/block/xen-blkback kernel/net \
          kernel/fs/9p kernel/fs/netfs kernel/fs/fscache kernel/lib kernel/crypto \
          kernel/drivers/net/xen-netback kernel/drivers/net/ifb.ko kernel/drivers/net/tun.ko \
          kernel/drivers/net/veth.ko kernel/drivers/net/dummy.ko kernel/drivers/block/loop.ko; do
     [ -e "$d" ] && cp -a --parents "$d" "$stage/$mods/"
 done
 rm -rf "$stage/$mods/kernel/net/wireless" "$stage/$mods/kernel/net/bluetooth" \
        "$stage/$mods/kernel/net/mac80211" "$stage/$mods/kernel/net/sunrpc" "$stage/$mods/kernel/net/ceph")
chroot "$stage" /sbin/depmod -a "$kver"
install -m 0755 "$here/dom0-init" "$stage/init"
echo "xenlab" > "$stage/etc/hostname"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$cache/dom0.cpio.gz.new"
mv "$cache/dom0.cpio.gz.new" "$cache/dom0.cpio.gz"
rm -rf "$stage"

# --- the PV guest: busybox and the network front end ----------------------
log "packing guest initramfs"
g=$cache/guest.stage
rm -rf "$g"
mkdir -p "$g/bin" "$g/lib/modules" "$g/www/cgi-bin"
cp "$(command -v busybox)" "$g/bin/busybox"
ldd "$g/bin/busybox" >/dev/null 2>&1 && { log "busybox is not static"; exit 1; }
find "$root/$mods/kernel/drivers/net" -name 'xen-netfront.ko*' -exec cp {} "$g/lib/modules/" \;
install -m 0755 "$here/guest-init" "$g/init"
install -m 0755 "$here/guest-kv.cgi" "$g/www/cgi-bin/kv"
(cd "$g" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) > "$cache/guest.cpio.gz"
rm -rf "$g"
echo "$inputs" > "$cache/images.stamp"
ls -la "$cache"/{xen,vmlinuz,dom0.cpio.gz,guest.cpio.gz} >&2
echo "$cache"
