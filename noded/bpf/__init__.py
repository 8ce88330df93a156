"""BPF: the libbpf binding, the map struct mirrors and the program loader."""
