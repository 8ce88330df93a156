// SPDX-License-Identifier: GPL-2.0
/* NodePort, external IP and load-balancer IP translation for packets that
 * arrive at the node from outside (tc programs on tcx links on the node's
 * interfaces; IPv4).
 *
 * ingress: a packet of a known flow is rewritten as its noded_nat entry says;
 *          the first packet of a flow to a NODED_SCOPE_EXTERNAL frontend picks
 *          a backend (session affinity by client IP, serving-terminating
 *          fallback) and records both directions of the flow.
 *          A backend on this node (reached through another interface) gets
 *          the packet with only its destination rewritten: the client address
 *          is kept and replies pass back through this node. A backend reached
 *          back out the same interface (another node) gets it source-NATed to
 *          this node, so replies come back here; those packets are sent out
 *          with a FIB lookup and a redirect, never through the local stack.
 * egress:  replies of local backends get their source rewritten back to the
 *          frontend the client addressed.
 * Sources inside the cluster CIDRs (pods on other nodes addressing this
 * node's node port) get the in-cluster backends, as kube-proxy's
 * short-circuit does for externalTrafficPolicy Local.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_maps.h"

#define AF_INET 2
#define FIB_SKIP_NEIGH 4	/* BPF_FIB_LOOKUP_SKIP_NEIGH (6.3) */
#define FIB_SRC        16	/* BPF_FIB_LOOKUP_SRC (6.5): fill ipv4_src */
#define NAT_PORT_MIN   32768
#define NAT_PORT_SPAN  28232	/* 32768..60999 */
#define NAT_PORT_TRIES 8
#define AFFINITY_BY_CLIENT_IP (1ULL << 63)

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF  (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF  (ETH_HLEN + offsetof(struct iphdr, daddr))

struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u32 l4off;
};

static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u16 *ports;
	__u32 ihl;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(0x3fff))	/* fragments are left to the stack */
		return 0;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip) || ihl > 60)
		return 0;
	ports = data + ETH_HLEN + ihl;
	if ((void *)(ports + 2) > end)
		return 0;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->sport = ports[0];
	f->dport = ports[1];
	f->proto = ip->protocol;
	f->l4off = ETH_HLEN + ihl;
	return 1;
}

/* The flow's 5-tuple as a noded_nat key for one direction. */
static __always_inline void nat_key(struct noded_nat_key *k, const struct flow *f, __u8 dir)
{
	k->saddr = f->saddr;
	k->daddr = f->daddr;
	k->sport = f->sport;
	k->dport = f->dport;
	k->proto = f->proto;
	k->dir = dir;
}

static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, const struct noded_nat_val *to)
{
	__u32 csum_off = f->l4off + (f->proto == IPPROTO_TCP ? 16 : 6);
	__u64 l4 = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (to->saddr != f->saddr &&
	    (bpf_l4_csum_replace(skb, csum_off, f->saddr, to->saddr, l4 | BPF_F_PSEUDO_HDR | 4) ||
	     bpf_l3_csum_replace(skb, IP_CSUM_OFF, f->saddr, to->saddr, 4) ||
	     bpf_skb_store_bytes(skb, IP_SRC_OFF, &to->saddr, 4, 0)))
		return -1;
	if (to->daddr != f->daddr &&
	    (bpf_l4_csum_replace(skb, csum_off, f->daddr, to->daddr, l4 | BPF_F_PSEUDO_HDR | 4) ||
	     bpf_l3_csum_replace(skb, IP_CSUM_OFF, f->daddr, to->daddr, 4) ||
	     bpf_skb_store_bytes(skb, IP_DST_OFF, &to->daddr, 4, 0)))
		return -1;
	if (to->sport != f->sport &&
	    (bpf_l4_csum_replace(skb, csum_off, f->sport, to->sport, l4 | 2) ||
	     bpf_skb_store_bytes(skb, f->l4off, &to->sport, 2, 0)))
		return -1;
	if (to->dport != f->dport &&
	    (bpf_l4_csum_replace(skb, csum_off, f->dport, to->dport, l4 | 2) ||
	     bpf_skb_store_bytes(skb, f->l4off + 2, &to->dport, 2, 0)))
		return -1;
	return 0;
}

static __always_inline int fib(struct __sk_buff *skb, struct bpf_fib_lookup *p, __u32 saddr, __u32 daddr, __u32 flags)
{
	p->family = AF_INET;
	p->ifindex = skb->ifindex;
	p->ipv4_src = saddr;
	p->ipv4_dst = daddr;
	return bpf_fib_lookup(skb, p, sizeof(*p), flags);
}

/* Send a rewritten packet out where the FIB says, resolving the next hop's MAC. */
static __always_inline int send_out(struct __sk_buff *skb, __u32 saddr, __u32 daddr)
{
	struct bpf_fib_lookup p = {};
	struct bpf_redir_neigh nh = { .nh_family = AF_INET };

	if (fib(skb, &p, saddr, daddr, FIB_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	nh.ipv4_nh = p.ipv4_dst;	/* the gateway, or daddr itself when on-link */
	return bpf_redirect_neigh(p.ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int apply(struct __sk_buff *skb, const struct flow *f, const struct noded_nat_val *to)
{
	if (rewrite(skb, f, to))
		return TC_ACT_SHOT;
	return (to->flags & NODED_NAT_REDIRECT) ? send_out(skb, to->saddr, to->daddr) : TC_ACT_OK;
}

static __always_inline struct noded_svc_val *frontend(const struct flow *f, struct noded_svc_key *key)
{
	struct noded_cidr_key pod = { .prefixlen = 32, .addr = f->saddr };
	struct noded_svc_val *svc;

	key->addr[2] = bpf_htonl(0xffff);
	key->addr[3] = f->daddr;
	key->port = f->dport;
	key->proto = f->proto;
	key->slot = 0;
	if (bpf_map_lookup_elem(&noded_cluster_cidrs, &pod)) {
		key->scope = NODED_SCOPE_SOCKET;	/* a pod: the in-cluster view */
		svc = bpf_map_lookup_elem(&noded_svc, key);
		if (svc)
			return svc;
	}
	key->scope = NODED_SCOPE_EXTERNAL;
	return bpf_map_lookup_elem(&noded_svc, key);
}

static __always_inline __u32 pick_backend(const struct flow *f, struct noded_svc_key *key,
					  const struct noded_svc_val *svc)
{
	struct noded_affinity_key akey = { .netns_cookie = AFFINITY_BY_CLIENT_IP | f->saddr, .svc_id = svc->svc_id };
	struct noded_affinity_val aval = {}, *aff;
	struct noded_backend *be;
	struct noded_svc_val *slot;
	__u32 count = svc->ready ? svc->ready : svc->terminating;
	__u64 now = 0;

	if (!count)
		return 0;
	if (svc->affinity_timeout) {
		now = bpf_ktime_get_ns();
		aff = bpf_map_lookup_elem(&noded_affinity, &akey);
		if (aff && now - aff->last_used_ns <= (__u64)svc->affinity_timeout * 1000000000ULL) {
			be = bpf_map_lookup_elem(&noded_backends, &aff->backend_id);
			if (be && !((be->flags & NODED_BACKEND_TERMINATING) && svc->ready)) {
				aff->last_used_ns = now;
				return aff->backend_id;
			}
		}
	}
	key->slot = 1 + bpf_get_prandom_u32() % count;
	slot = bpf_map_lookup_elem(&noded_svc, key);
	if (!slot)
		return 0;
	if (svc->affinity_timeout) {
		aval.last_used_ns = now;
		aval.backend_id = slot->backend_id;
		bpf_map_update_elem(&noded_affinity, &akey, &aval, BPF_ANY);
	}
	return slot->backend_id;
}

SEC("tc")
int noded_nodeport_ingress(struct __sk_buff *skb)
{
	struct noded_nat_key k = {};
	struct noded_nat_key rk = {};
	struct noded_nat_val fwd = {}, rev = {}, *nat;
	struct noded_svc_key key = {};
	struct noded_svc_val *svc;
	struct noded_backend *be;
	struct bpf_fib_lookup p = {};
	struct flow f = {};
	__u32 backend_id, base, i;

	if (!parse(skb, &f))
		return TC_ACT_OK;
	nat_key(&k, &f, NODED_NAT_DIR_INGRESS);
	nat = bpf_map_lookup_elem(&noded_nat, &k);
	if (nat) {
		fwd = *nat;
		return apply(skb, &f, &fwd);
	}
	svc = frontend(&f, &key);
	if (!svc)
		return TC_ACT_OK;
	backend_id = pick_backend(&f, &key, svc);
	be = backend_id ? bpf_map_lookup_elem(&noded_backends, &backend_id) : NULL;
	if (!be && (svc->flags & NODED_SVC_NO_ENDPOINTS) &&
	    fib(skb, &p, f.saddr, f.daddr, FIB_SKIP_NEIGH) == BPF_FIB_LKUP_RET_NOT_FWDED)
		return TC_ACT_OK;	/* addressed to this node: its stack refuses it (TCP RST, ICMP port unreachable) */
	if (!be || be->addr[2] != bpf_htonl(0xffff))
		return TC_ACT_SHOT;	/* no (IPv4) endpoint for it here: dropped, as kube-proxy does for Local */
	if (fib(skb, &p, f.saddr, be->addr[3], FIB_SKIP_NEIGH | FIB_SRC) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;

	/* reply direction: the client sees the frontend it addressed */
	rev.saddr = f.daddr;
	rev.daddr = f.saddr;
	rev.sport = f.dport;
	rev.dport = f.sport;
	rk.saddr = be->addr[3];
	rk.sport = be->port;
	rk.proto = f.proto;
	fwd.daddr = be->addr[3];
	fwd.dport = be->port;
	if (p.ifindex != skb->ifindex) {
		/* a backend on this node: replies route back through us and leave by egress */
		fwd.saddr = f.saddr;
		fwd.sport = f.sport;
		rk.daddr = f.saddr;
		rk.dport = f.sport;
		rk.dir = NODED_NAT_DIR_EGRESS;
	} else {
		/* another node's backend: source-NAT to this node so replies come back here */
		fwd.saddr = p.ipv4_src;
		fwd.flags = NODED_NAT_REDIRECT;
		rev.flags = NODED_NAT_REDIRECT;
		rk.daddr = p.ipv4_src;
		rk.dir = NODED_NAT_DIR_INGRESS;
		base = bpf_get_prandom_u32();
		for (i = 0; i < NAT_PORT_TRIES; i++) {
			rk.dport = bpf_htons(NAT_PORT_MIN + (base + i) % NAT_PORT_SPAN);
			if (!bpf_map_lookup_elem(&noded_nat, &rk))
				break;
		}
		if (i == NAT_PORT_TRIES)
			return TC_ACT_SHOT;
		fwd.sport = rk.dport;
	}
	if (bpf_map_update_elem(&noded_nat, &rk, &rev, BPF_ANY) ||
	    bpf_map_update_elem(&noded_nat, &k, &fwd, BPF_ANY))
		return TC_ACT_SHOT;
	return apply(skb, &f, &fwd);
}

SEC("tc")
int noded_nodeport_egress(struct __sk_buff *skb)
{
	struct noded_nat_key k = {};
	struct noded_nat_val to, *nat;
	struct flow f = {};

	if (!parse(skb, &f))
		return TC_ACT_OK;
	nat_key(&k, &f, NODED_NAT_DIR_EGRESS);
	nat = bpf_map_lookup_elem(&noded_nat, &k);
	if (!nat)
		return TC_ACT_OK;
	to = *nat;
	return rewrite(skb, &f, &to) ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
