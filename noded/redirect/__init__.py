"""In-pod traffic capture into the node tunnel's ports and DNS into the local resolver: the rules (rules.py),
the calls made inside a pod's netns (noded/kernel/podns.py), the listeners (proxy.py; the tunnel's client side is
noded/tunnel/outbound.py), and the pod registry that follows enrollment (manager.py)."""
