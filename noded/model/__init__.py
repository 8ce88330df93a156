"""The hub of every kind noded reads, pure: hub.py routes each source's objects to their owners (tracker.py:
services, slices, nodes, with a change tracker per consumer; pods.py: pods, namespaces, enrollment; and,
outside this package, the tunnel's policies and the waypoint registry); objects.py parses."""
