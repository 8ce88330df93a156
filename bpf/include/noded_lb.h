/* noded service load-balancing maps: the one definition of their key and value
 * layouts. noded/bpf/structs.py mirrors these structs once; a test checks the
 * mirror against this object's BTF.
 *
 * Addresses are always 16 bytes in network order: IPv6, or IPv4 mapped as
 * ::ffff:a.b.c.d, so one map serves both families and AF_INET6 sockets that
 * connect to a mapped IPv4 VIP are translated too.
 */
#ifndef NODED_LB_H
#define NODED_LB_H

#include <linux/types.h>

#define NODED_SVC_MAP_SIZE      262144
#define NODED_BACKEND_MAP_SIZE  262144
#define NODED_REVNAT_MAP_SIZE   262144
#define NODED_AFFINITY_MAP_SIZE 65536
#define NODED_NAT_MAP_SIZE      262144
#define NODED_CIDR_MAP_SIZE     64
#define NODED_SOCK_TERM_MAP_SIZE 65536

/* noded_backend.flags */
#define NODED_BACKEND_TERMINATING 0x1

/* noded_svc_val.flags (master entry) */
#define NODED_SVC_NO_ENDPOINTS 0x1	/* none anywhere: refuse; (Local policy without local ones: drop) */

/* noded_svc_key.scope: who a frontend entry serves */
#define NODED_SCOPE_SOCKET   0	/* sockets on this node (cgroup hooks): pods and the node itself */
#define NODED_SCOPE_EXTERNAL 1	/* packets arriving from outside the node (tc on its interfaces) */

/* A service frontend (slot 0, the master entry) or one of its backend slots. */
struct noded_svc_key {
	__u32 addr[4];
	__u16 port;		/* network order */
	__u8  proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8  scope;		/* NODED_SCOPE_* */
	__u16 slot;		/* 0: master entry; 1..: backend slots */
	__u16 pad2;
};

/* Master entry: slots 1..ready hold ready backends, the next `terminating`
 * slots hold serving-but-terminating ones (used only when none is ready).
 * Slot entry: backend_id names the backend in that slot. */
struct noded_svc_val {
	__u32 backend_id;
	__u32 svc_id;		/* stable per service port: affinity and reverse translation */
	__u16 ready;
	__u16 terminating;
	__u32 affinity_timeout;	/* seconds; 0: no session affinity */
	__u32 flags;
};

/* A backend belongs to exactly one service port: an id in this map is also
 * proof of membership, which session affinity relies on. */
struct noded_backend {
	__u32 addr[4];
	__u16 port;		/* network order */
	__u8  proto;
	__u8  flags;
};

/* Reverse translation for recvmsg/getpeername: socket + backend -> VIP. */
struct noded_revnat_key {
	__u64 cookie;
	__u32 addr[4];
	__u16 port;
	__u16 pad;
	__u32 pad2;
};

struct noded_revnat_val {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
	__u32 svc_id;
};

/* ClientIP session affinity. For sockets the client is the socket's network
 * namespace (one per pod), as Cilium's socket LB does: netns_cookie, client
 * zero. For packets from outside (tc) it is the source address: netns_cookie
 * is NODED_AFFINITY_BY_ADDRESS and client holds the address. */
#define NODED_AFFINITY_BY_ADDRESS (1ULL << 63)

struct noded_affinity_key {
	__u64 netns_cookie;
	__u32 client[4];
	__u32 svc_id;
	__u32 pad;
};

struct noded_affinity_val {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

/* NodePort / external IP translation state, one entry per direction of a
 * flow, keyed by the 5-tuple (addresses 16 bytes, IPv4 mapped) as the packet
 * carries it where it is looked up; the value is the 5-tuple to rewrite it to. */
#define NODED_NAT_DIR_INGRESS 0
#define NODED_NAT_DIR_EGRESS  1
#define NODED_NAT_REDIRECT    0x1	/* after the rewrite, send it back out (fib lookup) */

struct noded_nat_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  dir;		/* NODED_NAT_DIR_* */
	__u16 pad;
};

struct noded_nat_val {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u32 flags;		/* NODED_NAT_* */
};

/* The cluster CIDRs (LPM trie): sources inside them are pods. IPv4 CIDRs
 * are stored mapped (prefix length + 96). */
struct noded_cidr_key {
	__u32 prefixlen;
	__u32 addr[4];
};

/* Socket termination (sock_term.c): a backend a service port no longer has.
 * Userspace fills it after a sync, runs the socket iterators in every network
 * namespace of the cgroup, and empties it again; the value counts the sockets
 * destroyed for that entry. Only sockets the socket-LB translated for svc_id
 * (a noded_revnat entry for their cookie and destination) are touched. */
struct noded_term_key {
	__u32 addr[4];
	__u16 port;		/* network order */
	__u8  proto;
	__u8  pad;
	__u32 svc_id;
};

#endif
