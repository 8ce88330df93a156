// SPDX-License-Identifier: GPL-2.0
/* NodePort, external IP and load-balancer IP translation for packets that
 * arrive at the node from outside (tc programs on tcx links on the node's
 * interfaces; IPv4 and IPv6).
 *
 * ingress: a packet of a known flow is rewritten as its noded_nat entry says;
 *          the first packet of a flow (a TCP SYN, any UDP datagram) to a
 *          NODED_SCOPE_EXTERNAL frontend picks a backend (session affinity by
 *          client IP, serving-terminating fallback) and records both
 *          directions of the flow in noded_nat_new, from where it moves to
 *          noded_nat once proven two-way (noded_lb.h says how); a TCP segment
 *          of no known flow other than a SYN is dropped, as conntrack drops
 *          INVALID. Entries age and a FIN or RST closes them.
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
 * Addresses are handled as 16 bytes (IPv4 mapped, as in every noded map);
 * IPv6 packets with extension headers before TCP/UDP are left to the stack.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_maps.h"
#include "noded_select.h"

#define AF_INET  2
#define AF_INET6 10
#define FIB_SKIP_NEIGH 4	/* BPF_FIB_LOOKUP_SKIP_NEIGH (6.3) */
#define FIB_SRC        16	/* BPF_FIB_LOOKUP_SRC (6.5): fill the source address */
#define NAT_PORT_MIN   32768
#define NAT_PORT_SPAN  28232	/* 32768..60999 */
#define NAT_PORT_TRIES 8

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define ICMP_DEST_UNREACH   3	/* <linux/icmp.h> pulls in libc headers: the few constants here */
#define ICMP_PORT_UNREACH   3
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PORT_UNREACH 4

/* the ICMP and ICMPv6 header, as far as destination unreachable uses it */
struct icmp_unreach {
	__u8  type;
	__u8  code;
	__u16 checksum;
	__u32 unused;
};

#define IP_CSUM_OFF  (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF   (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF   (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF  (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF  (ETH_HLEN + offsetof(struct ipv6hdr, daddr))

/* The two entries of a new flow, built here rather than on the stack (512 bytes for the program and the
 * functions it calls). Per CPU: a tc program runs to its end on one. */
struct nat_pair {
	struct noded_nat_val fwd;
	struct noded_nat_val rev;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat_pair);
} noded_np_scratch SEC(".maps");

struct flow {
	__u32 saddr[4];		/* IPv4 mapped ::ffff:a.b.c.d */
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  v6;
	__u8  tcp_flags;	/* TCP: FIN SYN RST ... ACK */
	__u8  est;		/* its entry is in noded_nat (not noded_nat_new) */
	__u32 l4off;
	__u32 seq;		/* TCP, network order */
	__u32 ack_seq;
};

static __always_inline void map_v4(__u32 *a, __u32 v4)
{
	a[0] = 0;
	a[1] = 0;
	a[2] = bpf_htonl(0xffff);
	a[3] = v4;
}

static __always_inline int is_v4(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline void addr_copy(__u32 *to, const __u32 *from)
{
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	to[3] = from[3];
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int parse_ports(struct __sk_buff *skb, struct flow *f)
{
	__u16 *ports = (void *)(long)skb->data + f->l4off;
	__u32 *seqs = (void *)(ports + 2);
	__u8 *flags = (void *)(seqs + 2) + 1;	/* byte 13: the flags after data offset */

	if ((void *)(ports + 2) > (void *)(long)skb->data_end)
		return 0;
	f->sport = ports[0];
	f->dport = ports[1];
	if (f->proto == IPPROTO_TCP) {
		if ((void *)(flags + 1) > (void *)(long)skb->data_end)
			return 0;
		f->seq = seqs[0];
		f->ack_seq = seqs[1];
		f->tcp_flags = *flags;
	}
	return 1;
}

static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	struct iphdr *ip;
	__u32 ihl;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
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
		map_v4(f->saddr, ip->saddr);
		map_v4(f->daddr, ip->daddr);
		f->proto = ip->protocol;
		f->l4off = ETH_HLEN + ihl;
		return parse_ports(skb, f);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return 0;
		/* extension headers (fragments among them) are left to the stack */
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return 0;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		f->proto = ip6->nexthdr;
		f->v6 = 1;
		f->l4off = ETH_HLEN + sizeof(*ip6);
		return parse_ports(skb, f);
	}
	return 0;
}

/* The flow's 5-tuple as a noded_nat key for one direction. */
static __always_inline void nat_key(struct noded_nat_key *k, const struct flow *f, __u8 dir)
{
	addr_copy(k->saddr, f->saddr);
	addr_copy(k->daddr, f->daddr);
	k->sport = f->sport;
	k->dport = f->dport;
	k->proto = f->proto;
	k->dir = dir;
}

/* Replace one address (at l3off) and fix the checksums it is part of. */
static __always_inline int set_addr(struct __sk_buff *skb, const struct flow *f, __u32 csum_off, __u64 l4,
				    __u32 l3off, __u32 *from, __u32 *to)
{
	__s64 diff;

	if (!f->v6)
		return bpf_l4_csum_replace(skb, csum_off, from[3], to[3], l4 | BPF_F_PSEUDO_HDR | 4) ||
		       bpf_l3_csum_replace(skb, IP_CSUM_OFF, from[3], to[3], 4) ||
		       bpf_skb_store_bytes(skb, l3off, &to[3], 4, 0);
	/* IPv6 has no header checksum; the L4 one covers the addresses through the pseudo header */
	diff = bpf_csum_diff(from, 16, to, 16, 0);
	if (diff < 0)
		return -1;
	return bpf_l4_csum_replace(skb, csum_off, 0, diff, l4 | BPF_F_PSEUDO_HDR) ||
	       bpf_skb_store_bytes(skb, l3off, to, 16, 0);
}

static __always_inline int rewrite(struct __sk_buff *skb, struct flow *f, struct noded_nat_val *to)
{
	__u32 csum_off = f->l4off + (f->proto == IPPROTO_TCP ? 16 : 6);
	__u64 l4 = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (!addr_eq(to->saddr, f->saddr) &&
	    set_addr(skb, f, csum_off, l4, f->v6 ? IP6_SRC_OFF : IP_SRC_OFF, f->saddr, to->saddr))
		return -1;
	if (!addr_eq(to->daddr, f->daddr) &&
	    set_addr(skb, f, csum_off, l4, f->v6 ? IP6_DST_OFF : IP_DST_OFF, f->daddr, to->daddr))
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

/* A FIB lookup from saddr to daddr (16-byte forms; the family is daddr's). */
static __always_inline int fib(struct __sk_buff *skb, struct bpf_fib_lookup *p, const __u32 *saddr,
			       const __u32 *daddr, __u32 flags)
{
	p->ifindex = skb->ifindex;
	if (is_v4(daddr)) {
		p->family = AF_INET;
		p->ipv4_src = saddr[3];
		p->ipv4_dst = daddr[3];
	} else {
		p->family = AF_INET6;
		addr_copy(p->ipv6_src, saddr);
		addr_copy(p->ipv6_dst, daddr);
	}
	return bpf_fib_lookup(skb, p, sizeof(*p), flags);
}

/* The source address a successful FIB_SRC lookup chose, in 16-byte form. */
static __always_inline void fib_source(const struct bpf_fib_lookup *p, __u32 *out)
{
	if (p->family == AF_INET)
		map_v4(out, p->ipv4_src);
	else
		addr_copy(out, p->ipv6_src);
}

/* Send a rewritten packet out where the FIB says, resolving the next hop's MAC. */
static __always_inline int send_out(struct __sk_buff *skb, const __u32 *saddr, const __u32 *daddr)
{
	struct bpf_fib_lookup p = {};
	struct bpf_redir_neigh nh = {};

	if (fib(skb, &p, saddr, daddr, FIB_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	/* the gateway, or daddr itself when on-link */
	if (p.family == AF_INET) {
		nh.nh_family = AF_INET;
		nh.ipv4_nh = p.ipv4_dst;
	} else {
		nh.nh_family = AF_INET6;
		addr_copy(nh.ipv6_nh, p.ipv6_dst);
	}
	return bpf_redirect_neigh(p.ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int apply(struct __sk_buff *skb, struct flow *f, struct noded_nat_val *to)
{
	if (rewrite(skb, f, to))
		return TC_ACT_SHOT;
	return (to->flags & NODED_NAT_REDIRECT) ? send_out(skb, to->saddr, to->daddr) : TC_ACT_OK;
}

/* The entry for k, established or new (*est says which); an expired one counts as none. */
static __always_inline struct noded_nat_val *nat_lookup(const struct noded_nat_key *k, int *est, __u64 now)
{
	struct noded_nat_val *v = bpf_map_lookup_elem(&noded_nat, k);

	*est = 1;
	if (v && now - v->seen_ns > noded_ct_timeout(v->state, k->proto))
		v = NULL;	/* expired: a new flow of the same key may be in noded_nat_new */
	if (!v) {
		v = bpf_map_lookup_elem(&noded_nat_new, k);
		*est = 0;
		if (v && now - v->seen_ns > noded_ct_timeout(v->state, k->proto))
			return NULL;
	}
	return v;
}

/* Whether a new flow may take reply key rk: free, expired, or held by a flow that is closing. */
static __always_inline int reply_key_free(const struct noded_nat_key *rk, __u64 now)
{
	struct noded_nat_val *v;
	int est;

	v = nat_lookup(rk, &est, now);
	return !v || v->state == NODED_CT_CLOSING;
}

/* rk's destination port set to a port of the NAT range that makes it free (NAT_PORT_TRIES random tries);
 * -1 when none was. */
static __always_inline int free_reply_port(struct noded_nat_key *rk, __u64 now)
{
	__u32 base = bpf_get_prandom_u32(), i;

	for (i = 0; i < NAT_PORT_TRIES; i++) {
		rk->dport = bpf_htons(NAT_PORT_MIN + (base + i) % NAT_PORT_SPAN);
		if (reply_key_free(rk, now))
			return 0;
	}
	return -1;
}

/* The key of the flow's other entry: the packet this entry produces, seen coming back. */
static __always_inline void nat_partner(const struct noded_nat_key *k, const struct noded_nat_val *v,
					struct noded_nat_key *p)
{
	addr_copy(p->saddr, v->daddr);
	addr_copy(p->daddr, v->saddr);
	p->sport = v->dport;
	p->dport = v->sport;
	p->proto = k->proto;
	if ((v->flags & NODED_NAT_REPLY) || (v->flags & NODED_NAT_REDIRECT))
		p->dir = NODED_NAT_DIR_INGRESS;
	else
		p->dir = NODED_NAT_DIR_EGRESS;
}

/* Bookkeeping for a packet of a known flow: its time (to the second), a FIN or RST closing it (both
 * entries), a reply passing a new flow's reply entry (the SYN-ACK's sequence number kept), and a new
 * flow proven two-way moving to noded_nat. */
static __noinline void nat_track(const struct noded_nat_key *k, struct noded_nat_val *v, const struct flow *f,
				 __u64 now, struct noded_nat_key *scratch)
{
	struct noded_nat_key *pkp = scratch;	/* the caller's room: the two frames must fit 512 bytes */
	struct noded_nat_val *pv;
	int est = f->est;

	if (now - v->seen_ns > NODED_SEC)
		v->seen_ns = now;
	if (f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_FIN | TCP_RST))) {
		if (v->state != NODED_CT_CLOSING) {
			v->state = NODED_CT_CLOSING;
			v->seen_ns = now;
			nat_partner(k, v, pkp);
			pv = est ? bpf_map_lookup_elem(&noded_nat, pkp) : bpf_map_lookup_elem(&noded_nat_new, pkp);
			if (pv) {
				pv->state = NODED_CT_CLOSING;
				pv->seen_ns = now;
			}
		}
		return;
	}
	if (est)
		return;
	if (v->flags & NODED_NAT_REPLY) {
		if (v->state == NODED_CT_NEW &&
		    (f->proto != IPPROTO_TCP || (f->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))) {
			v->seq = f->seq;
			v->state = NODED_CT_REPLIED;
		}
		return;
	}
	/* the client again: two-way once its reply entry has passed a reply (TCP: this acknowledges it) */
	nat_partner(k, v, pkp);
	pv = bpf_map_lookup_elem(&noded_nat_new, pkp);
	if (!pv || pv->state != NODED_CT_REPLIED)
		return;
	if (f->proto == IPPROTO_TCP &&
	    (!(f->tcp_flags & TCP_ACK) || (f->tcp_flags & TCP_SYN) ||
	     bpf_ntohl(f->ack_seq) != bpf_ntohl(pv->seq) + 1))
		return;
	v->state = pv->state = NODED_CT_ESTABLISHED;
	v->seen_ns = pv->seen_ns = now;
	if (bpf_map_update_elem(&noded_nat, pkp, pv, BPF_ANY) || bpf_map_update_elem(&noded_nat, k, v, BPF_ANY))
		return;
	bpf_map_delete_elem(&noded_nat_new, pkp);
	bpf_map_delete_elem(&noded_nat_new, k);
}

static __always_inline struct noded_svc_val *frontend(const struct flow *f, struct noded_svc_key *key)
{
	struct noded_cidr_key pod = { .prefixlen = 128 };
	struct noded_svc_val *svc;

	addr_copy(pod.addr, f->saddr);
	addr_copy(key->addr, f->daddr);
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

/* The backend for a packet from outside (noded_select.h; affinity by client address). */
static __always_inline __u32 pick_backend(const struct flow *f, struct noded_svc_key *key,
					  const struct noded_svc_val *svc)
{
	struct noded_affinity_key akey = { .netns_cookie = NODED_AFFINITY_BY_ADDRESS, .svc_id = svc->svc_id };

	addr_copy(akey.client, f->saddr);
	return noded_pick_backend(key, svc, &akey);
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Answer the packet with ICMP port unreachable from the address it was sent to, as kube-proxy's reject
 * does for a service with no endpoints. A new IP + ICMP header goes in front of the packet, which becomes
 * the quoted original (whole when short, as a SYN is; else cut to its IP header + 8 bytes of L4, which
 * a checksum-offloaded TCP segment does not allow: those are dropped), and the result goes back out the
 * interface it came in on. */
#define QUOTE_MAX 128

static __always_inline __s64 quote_csum(struct __sk_buff *skb, __u32 quoted, __s64 sum)
{
	__u32 i, off, rem;
	__u32 w;

	for (i = 0; i < QUOTE_MAX / 4; i++) {
		off = i * 4;
		if (off >= quoted)
			break;
		rem = quoted - off;
		if (rem >= 4) {
			if (bpf_skb_load_bytes(skb, ETH_HLEN + off, &w, 4))
				return -1;
		} else {
			/* the last 1..3 bytes, zero padded: read the quote's last 4 bytes and shift the ones
			 * already summed out (little-endian: the first bytes in memory are the low ones) */
			if (bpf_skb_load_bytes(skb, ETH_HLEN + quoted - 4, &w, 4))
				return -1;
			w >>= 8 * (4 - rem);
		}
		sum = bpf_csum_diff(0, 0, &w, 4, (__u32)sum);
	}
	return sum;
}

/* Put the reply's new headers h (IP or IPv6, then ICMP) in front of the quoted packet, with the ICMP
 * checksum over the ICMP header and the quote (seed: the IPv6 pseudo header's sum, 0 for IPv4). */
static __always_inline int push_reply(struct __sk_buff *skb, void *h, __u32 len, struct icmp_unreach *icmp,
				      __u32 quoted, __s64 seed)
{
	__s64 sum = quote_csum(skb, quoted, seed);

	if (sum < 0)
		return -1;
	icmp->checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp), (__u32)sum));
	if (bpf_skb_adjust_room(skb, len, BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, h, len, BPF_F_RECOMPUTE_CSUM))
		return -1;
	return 0;
}

static __always_inline int reject(struct __sk_buff *skb, const struct flow *f)
{
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__u32 quoted = skb->len - ETH_HLEN;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_SHOT;
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (quoted > QUOTE_MAX) {
		if (bpf_skb_change_tail(skb, f->l4off + 8, 0))
			return TC_ACT_SHOT;
		quoted = f->l4off + 8 - ETH_HLEN;
	}
	if (quoted < 28 || quoted > QUOTE_MAX)
		return TC_ACT_SHOT;
	if (!f->v6) {
		struct {
			struct iphdr ip;
			struct icmp_unreach icmp;
		} h = {};

		h.ip.version = 4;
		h.ip.ihl = 5;
		h.ip.ttl = 64;
		h.ip.protocol = IPPROTO_ICMP;
		h.ip.tot_len = bpf_htons(sizeof(h) + quoted);
		h.ip.saddr = f->daddr[3];
		h.ip.daddr = f->saddr[3];
		h.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
		h.icmp.type = ICMP_DEST_UNREACH;
		h.icmp.code = ICMP_PORT_UNREACH;
		if (push_reply(skb, &h, sizeof(h), &h.icmp, quoted, 0))
			return TC_ACT_SHOT;
	} else {
		struct {
			__u32 saddr[4];
			__u32 daddr[4];
			__be32 len;
			__be32 next;
		} pseudo = {};
		struct {
			struct ipv6hdr ip6;
			struct icmp_unreach icmp;
		} h = {};

		h.ip6.version = 6;
		h.ip6.hop_limit = 64;
		h.ip6.nexthdr = IPPROTO_ICMPV6;
		h.ip6.payload_len = bpf_htons(sizeof(h.icmp) + quoted);
		__builtin_memcpy(&h.ip6.saddr, f->daddr, 16);
		__builtin_memcpy(&h.ip6.daddr, f->saddr, 16);
		h.icmp.type = ICMPV6_DEST_UNREACH;
		h.icmp.code = ICMPV6_PORT_UNREACH;
		addr_copy(pseudo.saddr, f->daddr);
		addr_copy(pseudo.daddr, f->saddr);
		pseudo.len = bpf_htonl(sizeof(h.icmp) + quoted);
		pseudo.next = bpf_htonl(IPPROTO_ICMPV6);
		if (push_reply(skb, &h, sizeof(h), &h.icmp, quoted,
			       bpf_csum_diff(0, 0, (__be32 *)&pseudo, sizeof(pseudo), 0)))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), BPF_F_RECOMPUTE_CSUM))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc")
int noded_nodeport_ingress(struct __sk_buff *skb)
{
	struct noded_nat_key k = {};
	struct noded_nat_key rk = {};
	struct noded_nat_val *fwd, *rev, *nat;
	struct nat_pair *pair;
	__u32 zero = 0;
	struct noded_svc_key key = {};
	struct noded_svc_val *svc;
	struct noded_backend *be;
	struct bpf_fib_lookup p = {};
	struct flow f = {};
	__u32 backend_id;
	__u64 now;
	int est;

	if (!parse(skb, &f))
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	nat_key(&k, &f, NODED_NAT_DIR_INGRESS);
	nat = nat_lookup(&k, &est, now);
	if (nat && f.proto == IPPROTO_UDP && !(nat->flags & NODED_NAT_REPLY) &&
	    !bpf_map_lookup_elem(&noded_backends, &nat->backend_id)) {
		/* its backend left the service: the flow ends here and this datagram starts a new one */
		nat_partner(&k, nat, &rk);
		if (est) {
			bpf_map_delete_elem(&noded_nat, &rk);
			bpf_map_delete_elem(&noded_nat, &k);
		} else {
			bpf_map_delete_elem(&noded_nat_new, &rk);
			bpf_map_delete_elem(&noded_nat_new, &k);
		}
		__builtin_memset(&rk, 0, sizeof(rk));
		nat = NULL;
	}
	if (nat && !(nat->state == NODED_CT_CLOSING && (f.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)) {
		pair = bpf_map_lookup_elem(&noded_np_scratch, &zero);
		if (!pair)
			return TC_ACT_SHOT;
		pair->fwd = *nat;
		f.est = est;
		nat_track(&k, nat, &f, now, &rk);
		return apply(skb, &f, &pair->fwd);
	}
	svc = frontend(&f, &key);
	if (!svc)
		return TC_ACT_OK;
	if (f.proto == IPPROTO_TCP && (f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) != TCP_SYN)
		return TC_ACT_SHOT;	/* no flow of ours, and not its start */
	backend_id = pick_backend(&f, &key, svc);
	be = backend_id ? bpf_map_lookup_elem(&noded_backends, &backend_id) : NULL;
	if (!be && (svc->flags & NODED_SVC_NO_ENDPOINTS)) {
		/* no endpoint anywhere: refused at once, as kube-proxy's reject. Addressed to this node (a node
		 * port), its own stack refuses it (TCP RST, ICMP port unreachable); other addresses (LB, external
		 * IPs) get the ICMP port unreachable from here. */
		if (fib(skb, &p, f.saddr, f.daddr, FIB_SKIP_NEIGH) == BPF_FIB_LKUP_RET_NOT_FWDED)
			return TC_ACT_OK;
		return reject(skb, &f);
	}
	if (!be || is_v4(be->addr) == f.v6)
		return TC_ACT_SHOT;	/* no endpoint (of this family) for it here: dropped, as kube-proxy does for Local */
	if (fib(skb, &p, f.saddr, be->addr, FIB_SKIP_NEIGH | FIB_SRC) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;

	pair = bpf_map_lookup_elem(&noded_np_scratch, &zero);
	if (!pair)
		return TC_ACT_SHOT;
	fwd = &pair->fwd;
	rev = &pair->rev;
	__builtin_memset(pair, 0, sizeof(*pair));
	/* reply direction: the client sees the frontend it addressed */
	rev->flags = NODED_NAT_REPLY;
	rev->seen_ns = fwd->seen_ns = now;
	rev->backend_id = fwd->backend_id = backend_id;
	addr_copy(rev->saddr, f.daddr);
	addr_copy(rev->daddr, f.saddr);
	rev->sport = f.dport;
	rev->dport = f.sport;
	addr_copy(rk.saddr, be->addr);
	rk.sport = be->port;
	rk.proto = f.proto;
	addr_copy(fwd->daddr, be->addr);
	fwd->dport = be->port;
	if (p.ifindex != skb->ifindex) {
		/* a backend on this node: replies route back through us and leave by egress. Their key names no
		 * frontend, so the same client port can reach this backend through two frontends (a node port
		 * and an LB IP): when another live flow holds the key, the client's port is changed, as conntrack
		 * resolves a clash; the reply entry gives the client its own port back. */
		addr_copy(fwd->saddr, f.saddr);
		addr_copy(rk.daddr, f.saddr);
		rk.dport = f.sport;
		rk.dir = NODED_NAT_DIR_EGRESS;
		if (!reply_key_free(&rk, now) && free_reply_port(&rk, now))
			return TC_ACT_SHOT;
		fwd->sport = rk.dport;
	} else {
		/* another node's backend: source-NAT to this node so replies come back here */
		fib_source(&p, fwd->saddr);
		fwd->flags = NODED_NAT_REDIRECT;
		rev->flags |= NODED_NAT_REDIRECT;
		addr_copy(rk.daddr, fwd->saddr);
		rk.dir = NODED_NAT_DIR_INGRESS;
		if (free_reply_port(&rk, now))
			return TC_ACT_SHOT;
		fwd->sport = rk.dport;
	}
	/* a flow that closed and starts again, or a reply key taken from a closed or expired flow: the old
	 * established entries go (they would shadow the new ones) */
	bpf_map_delete_elem(&noded_nat, &k);
	bpf_map_delete_elem(&noded_nat, &rk);
	if (bpf_map_update_elem(&noded_nat_new, &rk, rev, BPF_ANY) ||
	    bpf_map_update_elem(&noded_nat_new, &k, fwd, BPF_ANY))
		return TC_ACT_SHOT;
	return apply(skb, &f, fwd);
}

SEC("tc")
int noded_nodeport_egress(struct __sk_buff *skb)
{
	struct noded_nat_key k = {}, scratch = {};
	struct noded_nat_val to, *nat;
	struct flow f = {};
	__u64 now;
	int est;

	if (!parse(skb, &f))
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	nat_key(&k, &f, NODED_NAT_DIR_EGRESS);
	nat = nat_lookup(&k, &est, now);
	if (!nat)
		return TC_ACT_OK;
	to = *nat;
	f.est = est;
	nat_track(&k, nat, &f, now, &scratch);
	return rewrite(skb, &f, &to) ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
