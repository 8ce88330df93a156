"""Every privileged call noded makes that is not BPF (noded/bpf/ holds those: the libbpf binding, maps and
links): nft (nft.py: libnftables in process, and the nft binary), iptables (iptables.py: one backend's
commands, and kube-proxy's detection of the backend), conntrack (conntrack.py: netlink, pyroute2), and the
node's addresses (addresses.py: netlink, pyroute2). Capture's calls inside a pod's netns are
noded/redirect/podns.py, through nft.py and pyroute2; the DNS listener's are noded/dns/listen.py. Each tool's
callers take it as one object, and noded/services/fakes.py and noded/bpf/fakes.py stand in for them in unit
tests without root."""
