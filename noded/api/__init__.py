"""The daemon's gRPC API on a unix socket (service noded.v1.Noded, JSON message codec)."""
