"""Every privileged call noded makes that is not BPF (noded/bpf/ holds those: the libbpf binding, maps and
links): nft (nft.py: libnftables in process, and the nft binary), iptables (iptables.py: one backend's
commands, and kube-proxy's detection of the backend), conntrack (conntrack.py: netlink, pyroute2), the
node's addresses (addresses.py: netlink, pyroute2), the calls inside a pod's netns (podns.py: setns, the
capture's ruleset through nft.py, its reply routing through pyroute2), and the node-local DNS address's
objects (dnslisten.py: the noded-dns interface and addresses, the NOTRACK table, the sockets). pyroute2 is
imported nowhere else. Each tool's callers take it as one object, and noded/services/fakes.py and
noded/bpf/fakes.py stand in for them in unit tests without root."""
