"""The node tunnel: workload identities (SPIFFE), certificates, mTLS and L4 authorization (issue 6)."""
