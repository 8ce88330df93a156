"""noded-cni: the chained CNI plugin executable."""
