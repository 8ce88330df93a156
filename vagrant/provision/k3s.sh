#!/bin/bash
# The k3s source (NODED_SOURCE=k3s), as in the podless setup: node1 a k3s server, the others agents, all on
# the node's own containerd (so pods go through the same CNI chain and noded-cni), with every networking
# add-on disabled (no kube-proxy, flannel, CoreDNS, network policy, service LB); pod CIDRs are static per
# node (10.244.N.0/24, routed by the provisioner), so the controller manager allocates none.
# The k3s binary comes from vagrant/.cache/k3s (vagrant/lab.py downloads it where it can).
# Not run on the machine this was written on: it has no route to k3s's downloads.
# Usage: k3s.sh NAME INDEX FABRIC_PREFIX
set -euo pipefail
name=$1 index=$2 fabric=$3
binary=/noded/vagrant/.cache/k3s
[ -x "$binary" ] || { echo "[$name] $binary is missing: NODED_SOURCE=k3s needs k3s downloaded on the host" >&2; exit 1; }
install -m 755 "$binary" /usr/local/bin/k3s
ip=$fabric.$((10 + index))
common="--node-ip $ip --node-name $name --container-runtime-endpoint unix:///run/containerd/containerd.sock"
if [ "$index" = 1 ]; then
  args="server $common --token noded-lab --advertise-address $ip --cluster-cidr 10.244.0.0/16
    --service-cidr 10.96.0.0/16 --cluster-dns 169.254.20.10 --flannel-backend=none --disable-kube-proxy
    --disable-network-policy --disable-helm-controller --disable-cloud-controller
    --disable=coredns,servicelb,traefik,local-storage,metrics-server
    --kube-controller-manager-arg=allocate-node-cidrs=false --write-kubeconfig-mode 600"
else
  args="agent $common --server https://$fabric.11:6443 --token noded-lab"
fi
cat > /etc/systemd/system/k3s.service <<UNIT
[Unit]
Description=k3s ($name)
After=network-online.target containerd.service
Wants=network-online.target
[Service]
ExecStart=/usr/local/bin/k3s $(echo $args)
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now k3s
if [ "$index" = 1 ]; then
  for _ in $(seq 1 300); do [ -s /etc/rancher/k3s/k3s.yaml ] && break; sleep 1; done
  sed "s#https://127.0.0.1:6443#https://$ip:6443#" /etc/rancher/k3s/k3s.yaml > /etc/noded/kubeconfig
  chmod 600 /etc/noded/kubeconfig
fi
# the agents' noded gets node1's /etc/noded/kubeconfig from vagrant/lab.py after provisioning
