"""In-pod traffic capture into the node tunnel's ports and DNS into the local resolver."""
