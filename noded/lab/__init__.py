"""The multi-node lab on network namespaces."""
