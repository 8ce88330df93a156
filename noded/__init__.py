"""noded: a node networking daemon for Kubernetes."""

__version__ = "0.1.0"
