"""The node-local resolver: the cluster zone from the model, everything else forwarded."""
