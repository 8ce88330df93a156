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
#define NODED_NAT_NEW_MAP_SIZE  65536
#define NODED_CIDR_MAP_SIZE     64
#define NODED_SOCK_TERM_MAP_SIZE 65536
#define NODED_MESH_NETNS_MAP_SIZE 4096

/* Flags and kinds are enums with the width of the field that carries them (a
 * fixed underlying type), not #defines: the fields are typed by them, so the
 * object's BTF holds every value and noded/bpf/structs.py's mirrors are checked
 * against it (tests/bpf/test_btf_layout.py), as the structs are. */

/* noded_backend.flags */
enum noded_backend_flags : __u8 {
	NODED_BACKEND_TERMINATING = 0x1,
};

/* noded_svc_val.flags (master entry) */
enum noded_svc_flags : __u32 {
	NODED_SVC_NO_ENDPOINTS = 0x1,	/* none anywhere: refuse; (Local policy without local ones: drop) */
};

/* noded_svc_key.scope: who a frontend entry serves */
enum noded_scope : __u8 {
	NODED_SCOPE_SOCKET = 0,		/* sockets on this node (cgroup hooks): pods and the node itself */
	NODED_SCOPE_EXTERNAL = 1,	/* packets arriving from outside the node (tc on its interfaces) */
};

/* A service frontend (slot 0, the master entry) or one of its backend slots. */
struct noded_svc_key {
	__u32 addr[4];
	__u16 port;		/* network order */
	__u8  proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	enum noded_scope scope;
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
	enum noded_svc_flags flags;
};

/* A backend belongs to exactly one service port: an id in this map is also
 * proof of membership, which session affinity relies on. */
struct noded_backend {
	__u32 addr[4];
	__u16 port;		/* network order */
	__u8  proto;
	enum noded_backend_flags flags;
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
 * carries it where it is looked up; the value is the 5-tuple to rewrite it to.
 *
 * A flow is born in noded_nat_new (a TCP SYN, a UDP datagram) and moves to
 * noded_nat once it is proven two-way: for TCP, the client's ACK of the
 * SYN-ACK the backend sent (its sequence number is kept in the reply entry,
 * so a spoofed source cannot guess it); for UDP, a client datagram after a
 * reply. A flood from spoofed sources only ever churns noded_nat_new: the
 * established flows in noded_nat are not evicted by it. Entries carry the
 * time of their last packet and expire (NODED_CT_*_TIMEOUT: an expired entry
 * is never used, and noded/bpf/nat_gc.py deletes it at the next full sync); a
 * FIN or RST makes a flow closing. A UDP flow whose backend (backend_id) left
 * its service is ended at its next packet and chosen anew, as kube-proxy
 * deletes the conntrack entries of UDP endpoints that left. */
enum noded_nat_dir : __u8 {
	NODED_NAT_DIR_INGRESS = 0,
	NODED_NAT_DIR_EGRESS = 1,
};

enum noded_nat_flags : __u16 {
	NODED_NAT_REDIRECT = 0x1,	/* after the rewrite, send it back out (fib lookup) */
	NODED_NAT_REPLY = 0x2,		/* the flow's reply entry (rewrites back to the client) */
};

enum noded_ct_state : __u8 {
	NODED_CT_NEW = 0,		/* not proven two-way yet (in noded_nat_new) */
	NODED_CT_REPLIED = 1,		/* a reply entry in noded_nat_new that a reply has passed */
	NODED_CT_ESTABLISHED = 2,
	NODED_CT_CLOSING = 3,		/* a FIN or RST was seen */
};

#define NODED_SEC 1000000000ULL
#define NODED_CT_NEW_TIMEOUT_TCP  (60 * NODED_SEC)	/* an unanswered SYN (nf_conntrack: 60 s SYN_RECV) */
#define NODED_CT_NEW_TIMEOUT_UDP  (30 * NODED_SEC)	/* nf_conntrack_udp_timeout */
#define NODED_CT_TCP_TIMEOUT      (21600 * NODED_SEC)	/* established TCP: 6 h, as Cilium's CT */
#define NODED_CT_UDP_TIMEOUT      (120 * NODED_SEC)	/* nf_conntrack_udp_timeout_stream */
#define NODED_CT_CLOSING_TIMEOUT  (10 * NODED_SEC)

struct noded_nat_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	enum noded_nat_dir dir;
	__u16 pad;
};

struct noded_nat_val {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	enum noded_nat_flags flags;
	enum noded_ct_state state;
	__u8  pad;
	__u64 seen_ns;		/* bpf_ktime_get_ns() of its last packet (kept to the second) */
	__u32 seq;		/* a reply entry's SYN-ACK sequence number (network order) */
	__u32 backend_id;	/* the noded_backends entry the flow was given */
};

/* When an entry no longer counts: its state's timeout after its last packet. */
static __always_inline __u64 noded_ct_timeout(__u8 state, __u8 proto)
{
	if (state == NODED_CT_CLOSING)
		return NODED_CT_CLOSING_TIMEOUT;
	if (state == NODED_CT_ESTABLISHED)
		return proto == 6 ? NODED_CT_TCP_TIMEOUT : NODED_CT_UDP_TIMEOUT;
	return proto == 6 ? NODED_CT_NEW_TIMEOUT_TCP : NODED_CT_NEW_TIMEOUT_UDP;
}

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
