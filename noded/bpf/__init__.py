"""BPF: the libbpf binding (cffi; every map and link call), the mirrors of bpf/include's structs and enums
(checked against BTF) with packers derived from them, the loaders and link attachment (sock_lb.py, dns_fast.py,
sock_term.py), the NodePort flow collector (nat_gc.py), and dict-backed map fakes for unit tests (fakes.py)."""
