#!/bin/bash
# Provisions one lab node (runs in the VM as root): noded from the checkout (/noded) as a systemd unit,
# containerd + runc, the CNI chain (Debian's bridge + host-local, then noded-cni), routes to the other
# nodes' pod CIDRs (what a routed fabric or a cloud's route table does), and the source.
# Usage: node.sh NAME INDEX COUNT SOURCE(manifests|k3s) FABRIC_PREFIX
set -euo pipefail
name=$1 index=$2 count=$3 source=$4 fabric=$5
src=/noded
say() { echo "[$name] $*"; }

# packages: the locally built box has them all; a catalogue box gets them (and the 6.12 kernel) here
need=()
for p in containerd runc containernetworking-plugins nftables iptables python3-venv busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
kernel_ok() { printf '%s\n6.6\n' "$(uname -r | cut -d- -f1)" | sort -V -C -r; }
if ! kernel_ok; then  # tcx needs Linux 6.6: take bookworm-backports' kernel and ask for a reboot
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports linux-image-amd64 >/dev/null
  say "kernel $(uname -r) is older than 6.6: installed bookworm-backports' kernel; run 'vagrant reload --provision'"
  exit 0
fi

# noded: its wheel and its dependencies' wheels were built on the host (vagrant/lab.py wheels); no index
say "noded from $src"
[ -x /opt/noded/venv/bin/python ] || python3 -m venv /opt/noded/venv
# this checkout's noded first, then what its metadata requires (the other order misses a dependency added
# since the installed one: pip finds noded "already satisfied" by the old metadata)
/opt/noded/venv/bin/pip install -q --no-index --find-links "$src/vagrant/.cache/wheels" --force-reinstall --no-deps noded
/opt/noded/venv/bin/pip install -q --no-index --find-links "$src/vagrant/.cache/wheels" noded
ln -sf /opt/noded/venv/bin/noded /usr/local/bin/noded

# CNI: the reference plugins where runtimes look, the primary config, noded-cni chained last
mkdir -p /opt/cni/bin /etc/cni/net.d /etc/noded/manifests
for p in /usr/lib/cni/*; do ln -sf "$p" /opt/cni/bin/; done
if [ ! -e /etc/cni/net.d/10-lab.conflist ]; then
  cat > /etc/cni/net.d/10-lab.conflist <<CNI
{"cniVersion": "1.0.0", "name": "lab", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$index.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
]}
CNI
fi
noded install >/dev/null
noded cni install --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin >/dev/null

# forwarding and the other nodes' pod CIDRs, at every boot
cat > /etc/sysctl.d/90-noded-lab.conf <<SYSCTL
net.ipv4.ip_forward = 1
SYSCTL
sysctl -q -p /etc/sysctl.d/90-noded-lab.conf
routes=""
for ((j = 1; j <= count; j++)); do
  [ "$j" = "$index" ] || routes+="ip route replace 10.244.$j.0/24 via $fabric.$((10 + j)); "
done
cat > /etc/systemd/system/noded-lab-routes.service <<UNIT
[Unit]
Description=noded lab: routes to the other nodes' pods
After=network-online.target
Wants=network-online.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c '${routes:-true}'
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now noded-lab-routes >/dev/null 2>&1

# the busybox root file system lab pods run from (vagrant/guest/pod.py)
rootfs=/var/lib/noded-lab/rootfs
if [ ! -f $rootfs/.done ]; then
  rm -rf $rootfs
  mkdir -p $rootfs/bin $rootfs/etc $rootfs/www $rootfs/tmp $rootfs/proc $rootfs/sys $rootfs/dev
  cp /bin/busybox $rootfs/bin/
  for app in $(/bin/busybox --list); do [ "$app" = busybox ] || ln -sf busybox "$rootfs/bin/$app"; done
  echo 'root:x:0:0:root:/:/bin/sh' > $rootfs/etc/passwd
  echo 'hosts: files dns' > $rootfs/etc/nsswitch.conf
  echo '127.0.0.1 localhost' > $rootfs/etc/hosts
  touch $rootfs/.done
fi

# the source: the manifest directory (offline), or the k3s API server
if [ "$source" = k3s ]; then
  bash "$src/vagrant/provision/k3s.sh" "$name" "$index" "$fabric"
  kube_source="source: {kubeconfig: /etc/noded/kubeconfig}"
else
  node_docs=""
  for ((j = 1; j <= count; j++)); do
    node_docs+="---
apiVersion: v1
kind: Node
metadata: {name: node$j, labels: {kubernetes.io/hostname: node$j}}
spec: {podCIDR: 10.244.$j.0/24, podCIDRs: [10.244.$j.0/24]}
status: {addresses: [{type: InternalIP, address: $fabric.$((10 + j))}, {type: Hostname, address: node$j}]}
"
  done
  printf '%s' "$node_docs" > /etc/noded/manifests/nodes.yaml
  kube_source="source: {directory: /etc/noded/manifests}"
fi
# the tunnel: the lab's root (vagrant/lab.py makes it); node1 holds its key and serves the CA on the fabric
ca=$src/vagrant/.cache/ca
install -d -m 700 /etc/noded/ca
install -m 644 "$ca/root.pem" /etc/noded/ca/root.pem
if [ "$index" = 1 ]; then
  install -m 600 "$ca/root-key.pem" /etc/noded/ca/root-key.pem
  tunnel="tunnel: {caKey: /etc/noded/ca/root-key.pem, caListen: '$fabric.11:15012'}"
else
  install -m 644 "$ca/nodes/$name.pem" /etc/noded/ca/node.pem
  install -m 600 "$ca/nodes/$name-key.pem" /etc/noded/ca/node-key.pem
  tunnel="tunnel: {caAddress: '$fabric.11:15012', nodeCert: /etc/noded/ca/node.pem, nodeKey: /etc/noded/ca/node-key.pem}"
fi
cat > /etc/noded/config.yaml <<CONFIG
apiVersion: noded.io/v1alpha1
kind: NodedConfiguration
nodeName: $name
$kube_source
clusterCIDRs: [10.244.0.0/16]
services: {mode: ebpf}
$tunnel
CONFIG
systemctl enable noded >/dev/null 2>&1
if [ "$source" = k3s ] && [ ! -s /etc/noded/kubeconfig ]; then
  say "noded waits for its kubeconfig (vagrant/lab.py copies node1's)"
  exit 0
fi
systemctl restart noded
for _ in $(seq 1 120); do systemctl is-active -q noded && break; sleep 1; done
systemctl is-active -q noded || { journalctl -u noded --no-pager | tail -30; exit 1; }
say "noded is up: $(noded status 2>/dev/null | head -3 | tr '\n' ' ')"
