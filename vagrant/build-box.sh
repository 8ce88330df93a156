#!/bin/bash
# Builds the lab's Vagrant box locally, from the Debian mirror apt already uses: debootstrap bookworm,
# the bookworm-backports cloud kernel (6.12: noded's tcx links need Linux >= 6.6), containerd + runc and
# the CNI reference plugins, a bootable qcow2 (MBR, extlinux), packaged as a libvirt .box.
# No box catalogue is needed. Run as root; output: vagrant/.cache/noded-debian12.box
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${NODED_VAGRANT_CACHE:-$here/.cache}
box=$cache/noded-debian12.box
work=$cache/box-build
size=${BOX_SIZE:-8G}
mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
packages=systemd-sysv,udev,dbus,openssh-server,sudo,rsync,ifupdown,isc-dhcp-client,iproute2,iputils-ping,\
nftables,iptables,procps,less,ca-certificates,python3,python3-venv,containerd,runc,\
containernetworking-plugins,busybox-static,initramfs-tools,e2fsprogs,kmod

[ "$(id -u)" = 0 ] || { echo "build-box: run as root" >&2; exit 1; }
for tool in debootstrap qemu-img sfdisk extlinux /usr/lib/EXTLINUX/mbr.bin; do
  command -v "$tool" >/dev/null || [ -e "$tool" ] || {
    echo "build-box: $tool missing (make vagrant-deps installs debootstrap qemu-utils fdisk extlinux)" >&2; exit 1; }
done
mkdir -p "$cache"
rootfs=$work/rootfs
mnt=$work/mnt
loop=
cleanup() {
  set +e
  for m in dev/pts dev proc sys; do mountpoint -q "$rootfs/$m" && umount -l "$rootfs/$m"; done
  mountpoint -q "$mnt" && umount -l "$mnt"
  [ -n "$loop" ] && losetup -d "$loop"
}
trap cleanup EXIT

if [ ! -e "$rootfs/.debootstrap-done" ]; then
  rm -rf "$rootfs"; mkdir -p "$rootfs"
  echo "build-box: debootstrap bookworm from $mirror"
  debootstrap --include="$packages" bookworm "$rootfs" "$mirror" >"$work.debootstrap.log" 2>&1 || {
    tail -20 "$work.debootstrap.log" >&2; exit 1; }
  touch "$rootfs/.debootstrap-done"
fi

in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
for m in proc sys dev dev/pts; do mount --bind "/$m" "$rootfs/$m"; done
if [ ! -e "$rootfs/.kernel-done" ]; then
  echo "deb $mirror bookworm-backports main" > "$rootfs/etc/apt/sources.list.d/backports.list"
  in_root apt-get update -qq
  echo "build-box: kernel from bookworm-backports"
  in_root apt-get install -y -qq --no-install-recommends -t bookworm-backports linux-image-cloud-amd64 >/dev/null
  touch "$rootfs/.kernel-done"
fi
# the vagrant user (the well-known insecure key: vagrant replaces it at first boot), sshd, network, console
in_root id vagrant >/dev/null 2>&1 || in_root useradd -m -s /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$rootfs/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$rootfs/home/vagrant/.ssh"
key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1)
[ -n "$key" ] || { echo "build-box: vagrant's insecure public key not found (apt install vagrant)" >&2; exit 1; }
install -m 600 -o 1000 -g 1000 "$key" "$rootfs/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' > "$rootfs/etc/ssh/sshd_config.d/vagrant.conf"
echo noded-box > "$rootfs/etc/hostname"
printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' > "$rootfs/etc/network/interfaces"
echo 'LABEL=noded-root / ext4 defaults,noatime 0 1' > "$rootfs/etc/fstab"
rm -f "$rootfs/etc/ssh/ssh_host_"*  # each VM its own host keys
in_root systemctl enable ssh containerd >/dev/null 2>&1
cat > "$rootfs/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
in_root systemctl enable ssh-host-keys >/dev/null 2>&1
in_root apt-get clean
for m in dev/pts dev proc sys; do umount -l "$rootfs/$m"; done

echo "build-box: disk image ($size)"
# one bootable MBR partition from 1 MiB, booted by extlinux (written through a loop device at the partition's
# offset: no partition device nodes are needed, so this also works where udev does not run)
raw=$work/disk.raw
rm -f "$raw"; truncate -s "$size" "$raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
dd if=/usr/lib/EXTLINUX/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
loop=$(losetup -f --show -o $((2048 * 512)) "$raw")
mkfs.ext4 -q -L noded-root -O ^64bit,^metadata_csum_seed "$loop"
mkdir -p "$mnt"; mount "$loop" "$mnt"
cp -a "$rootfs/." "$mnt/"
rm -f "$mnt/.debootstrap-done" "$mnt/.kernel-done"
kernel=$(cd "$mnt/boot" && ls vmlinuz-* | sort -V | tail -1)
mkdir -p "$mnt/boot/extlinux"
extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1 || extlinux --install "$mnt/boot/extlinux"
cat > "$mnt/boot/extlinux/extlinux.conf" <<CFG
DEFAULT debian
TIMEOUT 1
PROMPT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/initrd.img-${kernel#vmlinuz-}
  APPEND root=LABEL=noded-root ro net.ifnames=0 biosdevname=0 console=ttyS0,115200 quiet
CFG
umount "$mnt"
losetup -d "$loop"; loop=

echo "build-box: qcow2 and .box"
qemu-img convert -O qcow2 "$raw" "$work/box.img"
rm -f "$raw"
virtual=$(( $(numfmt --from=iec "$size") / 1024 / 1024 / 1024 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$virtual" > "$work/metadata.json"
cat > "$work/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
VF
tar -C "$work" -cf "$box.tmp" metadata.json Vagrantfile box.img
mv "$box.tmp" "$box"
rm -f "$work/box.img"
echo "build-box: $box ($(du -h "$box" | cut -f1))"
