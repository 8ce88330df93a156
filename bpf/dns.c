// SPDX-License-Identifier: GPL-2.0
/* The DNS fast path: a tc ingress program on the interfaces facing this
 * node's pods (their bridge) that answers A and AAAA queries sent to an
 * address noded serves DNS on (noded_dns_listen: the node-local address
 * and the cluster DNS addresses), over IPv4 or IPv6 UDP:
 *  - cluster names from noded_dns, a map noded keeps in step with the model;
 *  - external names from noded_dns_cache, the answers the resolver learned
 *    upstream (positive and negative), their TTLs aged by the time since,
 *    never served once expired, evicted least recently used first.
 *
 * Only the plainest queries are answered here: a standard query with one
 * IN question of at most NODED_DNS_NAME_MAX bytes, nothing else but at most
 * one EDNS0 OPT of version 0 (and for the cache, without the DO bit). The
 * packet is turned into the reply in place (header, question as the client
 * wrote it, the records, an OPT if the query had one: what userspace writes
 * for the same question, byte for byte) and sent back out the interface it
 * came in on. A reply larger than the client's UDP size (512 bytes, or its
 * EDNS0 payload size capped at 1232) is never truncated here: the query
 * passes to userspace, which sets TC. Everything else — a miss, another
 * type, an expired entry — passes to the stack, where the resolver answers.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_dns.h"

#define SCRATCH    (NODED_DNS_NAME_MAX + 4 + 11)	/* name, type and class, an OPT record */
#define OPT_LEN    11
#define TYPE_A     1
#define TYPE_AAAA  28
#define TYPE_OPT   41
#define UDP_MIN    512
#define UDP_MAX    1232
#define CSUM_CHUNKS 4				/* 4 × 256 bytes: more than any reply written here */
#define NSEC       1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_DNS_MAP_SIZE);
	__type(key, struct noded_dns_key);
	__type(value, struct noded_dns_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NODED_DNS_CACHE_SIZE);
	__type(key, struct noded_dns_key);
	__type(value, struct noded_dns_cached);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_DNS_LISTEN_SIZE);
	__type(key, struct noded_dns_listen_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns_listen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NODED_DNS_STATS);
	__type(key, __u32);		/* enum noded_dns_stat (an array map's key must be an int in BTF) */
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns_stats SEC(".maps");

/* per-CPU scratch: the lookup key and the bytes after the header (later: a checksum window) */
struct scratch {
	struct noded_dns_key key;
	__u8 buf[256];		/* SCRATCH used; the length read is masked to 0xff for the verifier */
	enum noded_dns_stat unused;	/* never read: it puts the stats' enum in BTF (checked against structs.py) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} noded_dns_scratch SEC(".maps");

struct dns_header {
	__u16 id;
	__u8  flags1;		/* QR opcode AA TC RD */
	__u8  flags2;		/* RA Z AD CD rcode */
	__u16 qdcount;
	__u16 ancount;
	__u16 nscount;
	__u16 arcount;
};

/* one answer record: a pointer to the question's name, then the fixed part and the address */
struct dns_rr {
	__u16 name;
	__u16 type;
	__u16 class;
	__u16 ttl_hi;
	__u16 ttl_lo;
	__u16 rdlen;
	__u8  rdata[16];
} __attribute__((packed));

struct pseudo6 {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__be32 len;
	__be32 next;
};

struct name_walk {
	struct scratch *sc;
	__u32 next;		/* where the next label's length byte is */
	__u32 name_len;		/* set at the root label */
	__u32 bad;
};

static long walk_name(__u32 i, void *ctx)
{
	struct name_walk *w = ctx;
	__u8 c;

	if (i >= NODED_DNS_NAME_MAX)
		return 1;
	c = w->sc->buf[i];
	if (i == w->next) {
		if (c == 0) {
			w->name_len = i + 1;
			return 1;
		}
		if (c > 63) {	/* a compression pointer or a reserved label type */
			w->bad = 1;
			return 1;
		}
		w->next = i + c + 1;
	} else if (c >= 'A' && c <= 'Z') {
		c += 'a' - 'A';
	}
	w->sc->key.name[i] = c;
	return 0;
}

static __always_inline void count(enum noded_dns_stat k)
{
	__u64 *n = bpf_map_lookup_elem(&noded_dns_stats, &k);

	if (n)
		*n += 1;
}

static __always_inline int pass(void)
{
	count(NODED_DNS_STAT_PASSED);
	return TC_ACT_OK;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* in [1, mask + 1] for the verifier (clang knows tighter bounds and would drop a plain mask) */
#define BOUND(v, mask) asm volatile("%0 += -1; %0 &= " #mask "; %0 += 1" : "+r"(v))

/* The zone's addresses as answer records at off, turned by the query ID (the first: ID mod count), as the
 * resolver turns them (CoreDNS's loadbalance round robin, made deterministic); 0, or -1 once the packet is
 * half written. */
static __always_inline int write_records(struct __sk_buff *skb, __u32 off, struct noded_dns_val *val, __u16 qtype,
					 __u16 id)
{
	__u32 rdlen = qtype == TYPE_A ? 4 : 16, rr_len = 12 + rdlen, i, count = val->count;
	__u32 first = count ? bpf_ntohs(id) % count : 0;
	struct dns_rr rr = {
		.name = bpf_htons(0xc00c),
		.type = bpf_htons(qtype),
		.class = bpf_htons(1),
		.ttl_hi = bpf_htons(val->ttl >> 16),
		.ttl_lo = bpf_htons(val->ttl & 0xffff),
		.rdlen = bpf_htons(rdlen),
	};

	for (i = 0; i < NODED_DNS_ADDRS_MAX; i++) {
		if (i >= count)
			break;
		__u32 j = first + i;
		if (j >= count)
			j -= count;
		__builtin_memcpy(rr.rdata, val->addr[j & (NODED_DNS_ADDRS_MAX - 1)], 16);
		if (bpf_skb_store_bytes(skb, off + i * rr_len, &rr, qtype == TYPE_A ? 16 : 28, 0))
			return -1;
	}
	return 0;
}

/* A cached answer's records at off, each TTL less the whole seconds since it was stored. */
static __always_inline int write_cached(struct __sk_buff *skb, __u32 off, struct noded_dns_cached *c, __u32 age)
{
	__u32 len = c->len, i;

	if (len) {
		BOUND(len, 0x1ff);
		if (bpf_skb_store_bytes(skb, off, c->data, len, 0))
			return -1;
	}
	for (i = 0; i < NODED_DNS_CACHE_TTLS; i++) {
		if (i >= c->nttl)
			break;
		__u32 at = c->ttl_off[i] & 0x1ff;
		if (at > NODED_DNS_CACHE_DATA - 4)
			return -1;
		__u32 ttl = ((__u32)c->data[at] << 24) | ((__u32)c->data[at + 1] << 16) |
			    ((__u32)c->data[at + 2] << 8) | c->data[at + 3];
		ttl = bpf_htonl(ttl > age ? ttl - age : 0);
		if (bpf_skb_store_bytes(skb, off + at, &ttl, 4, 0))
			return -1;
	}
	return 0;
}

/* The UDP checksum over IPv6 (mandatory there): the pseudo-header, then the datagram as written. */
static __always_inline int udp6_checksum(struct __sk_buff *skb, struct scratch *sc, __u32 l4, __u32 udp_len,
					 struct pseudo6 *ph)
{
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)ph, sizeof(*ph), 0);
	__u32 i;

	for (i = 0; i < CSUM_CHUNKS; i++) {
		__u32 done = i * 256;
		if (done >= udp_len)
			break;
		__u32 n = udp_len - done;
		if (n > 256)
			n = 256;
		BOUND(n, 0xff);
		__u32 word = (n - 1) & 0xfc;	/* the last 4-byte word, zero-padded past the data */
		*(__u32 *)(sc->buf + word) = 0;
		if (bpf_skb_load_bytes(skb, l4 + done, sc->buf, n))
			return -1;
		sum = bpf_csum_diff(0, 0, (__be32 *)sc->buf, word + 4, sum);
		if (sum < 0)
			return -1;
	}
	__u16 check = csum_fold((__u32)sum);
	if (!check)
		check = 0xffff;
	return bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, check), &check, 2, 0) ? -1 : 0;
}

SEC("tc")
int noded_dns_fast(struct __sk_buff *skb)
{
	struct noded_dns_listen_key lk = {};
	struct noded_dns_val *val = NULL;
	struct noded_dns_cached *cached = NULL;
	struct pseudo6 ph = {};
	struct iphdr ip4;
	struct udphdr udp;
	struct dns_header h;
	struct scratch *sc;
	__u32 l4, zero = 0, age = 0;
	__u8 v6 = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip4, sizeof(ip4)))
			return TC_ACT_OK;
		if (ip4.ihl != 5 || ip4.protocol != IPPROTO_UDP || (ip4.frag_off & bpf_htons(0x3fff)))
			return TC_ACT_OK;
		lk.addr[10] = lk.addr[11] = 0xff;
		__builtin_memcpy(&lk.addr[12], &ip4.daddr, 4);
		l4 = ETH_HLEN + sizeof(struct iphdr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return TC_ACT_OK;
		if (ip6.nexthdr != IPPROTO_UDP)	/* extension headers: userspace */
			return TC_ACT_OK;
		__builtin_memcpy(lk.addr, &ip6.daddr, 16);
		ph.saddr = ip6.daddr;	/* the reply's source: the address asked */
		ph.daddr = ip6.saddr;
		ph.next = bpf_htonl(IPPROTO_UDP);
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
		v6 = 1;
	} else {
		return TC_ACT_OK;
	}
	if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)))
		return TC_ACT_OK;
	lk.port = udp.dest;
	if (!bpf_map_lookup_elem(&noded_dns_listen, &lk))
		return TC_ACT_OK;

	__u32 dns_off = l4 + sizeof(struct udphdr), qname_off = dns_off + sizeof(h);
	if (skb->len < qname_off + 5 || bpf_ntohs(udp.len) != skb->len - l4 ||
	    bpf_skb_load_bytes(skb, dns_off, &h, sizeof(h)))
		return pass();
	/* a standard query (QR=0, opcode 0, not truncated), one question, no answers */
	if ((h.flags1 & 0xfa) || h.qdcount != bpf_htons(1) || h.ancount || h.nscount || bpf_ntohs(h.arcount) > 1)
		return pass();
	sc = bpf_map_lookup_elem(&noded_dns_scratch, &zero);
	if (!sc)
		return pass();
	__u8 *buf = sc->buf;
	struct noded_dns_key *key = &sc->key;
	__builtin_memset(key, 0, sizeof(*key));
	__u32 total = skb->len - qname_off;
	__u32 want = total < SCRATCH ? total : SCRATCH;
	BOUND(want, 0xff);
	if (bpf_skb_load_bytes(skb, qname_off, buf, want))
		return pass();

	/* the name, lowercased, until its root label (bpf_loop: verified once, not per byte) */
	struct name_walk w = {.sc = sc};
	bpf_loop(NODED_DNS_NAME_MAX, walk_name, &w, 0);
	if (w.bad)
		return pass();
	__u32 name_len = w.name_len;
	if (!name_len || name_len + 4 > total || name_len > NODED_DNS_NAME_MAX)
		return pass();
	key->qtype = (buf[name_len] << 8) | buf[name_len + 1];
	if ((key->qtype != TYPE_A && key->qtype != TYPE_AAAA) || buf[name_len + 2] != 0 || buf[name_len + 3] != 1)
		return pass();

	/* what follows the question: nothing, or one OPT of version 0 and nothing after it */
	__u32 rest = total - name_len - 4, limit = UDP_MIN;
	__u8 edns = h.arcount != 0, dnssec_ok = 0;
	if (edns) {
		__u8 *opt = buf + name_len + 4;
		if (rest < OPT_LEN || opt[0] != 0 || opt[1] != 0 || opt[2] != TYPE_OPT || opt[6] != 0 ||
		    rest != OPT_LEN + ((opt[9] << 8) | opt[10]))
			return pass();
		__u32 payload = (opt[3] << 8) | opt[4];
		limit = payload < UDP_MIN ? UDP_MIN : payload > UDP_MAX ? UDP_MAX : payload;
		dnssec_ok = opt[7] & 0x80;
	} else if (rest) {
		return pass();
	}

	/* a cluster name, else a cached external one (DO=0 only: the resolver keys its cache by DO) */
	__u32 body;
	val = bpf_map_lookup_elem(&noded_dns, key);
	if (val) {
		if (val->count == 0 || val->count > NODED_DNS_ADDRS_MAX)
			return pass();
		body = val->count * (key->qtype == TYPE_A ? 16 : 28);
	} else {
		if (dnssec_ok)
			return pass();
		cached = bpf_map_lookup_elem(&noded_dns_cache, key);
		if (!cached)
			return pass();
		__u64 now = bpf_ktime_get_ns();
		if (now >= cached->expires_ns) {
			bpf_map_delete_elem(&noded_dns_cache, key);
			count(NODED_DNS_STAT_EXPIRED);
			return pass();
		}
		if (cached->len > NODED_DNS_CACHE_DATA || cached->nttl > NODED_DNS_CACHE_TTLS)
			return pass();
		age = (now - cached->stored_ns) / NSEC;
		body = cached->len;
	}

	/* the reply, in place; one that would not fit the client's UDP size is userspace's to truncate */
	__u32 answers = qname_off + name_len + 4;
	__u32 new_len = answers + body + (edns ? OPT_LEN : 0);
	if (new_len - dns_off > limit)
		return pass();
	__u16 id = h.id;
	__u8 rd = h.flags1 & 0x01;
	__u16 sport = udp.source, dport = udp.dest;

	if (bpf_skb_change_tail(skb, new_len, 0))
		return pass();
	if (val ? write_records(skb, answers, val, key->qtype, id) : write_cached(skb, answers, cached, age))
		return TC_ACT_SHOT;
	if (edns) {
		__u8 opt[OPT_LEN] = {0, 0, TYPE_OPT, UDP_MAX >> 8, UDP_MAX & 0xff};	/* root, OPT, 1232, no flags */
		if (bpf_skb_store_bytes(skb, new_len - OPT_LEN, opt, OPT_LEN, 0))
			return TC_ACT_SHOT;
	}

	struct dns_header reply = {.id = id, .qdcount = bpf_htons(1), .arcount = bpf_htons(edns)};
	if (val) {
		reply.flags1 = 0x84 | rd;	/* QR AA, RD as asked */
		reply.flags2 = 0x80;		/* RA */
		reply.ancount = bpf_htons(val->count);
	} else {
		reply.flags1 = 0x80 | rd;	/* QR, RD as asked */
		reply.flags2 = cached->flags2;
		reply.ancount = bpf_htons(cached->ancount);
		reply.nscount = bpf_htons(cached->nscount);
		reply.arcount = bpf_htons(cached->arcount + edns);
	}
	if (bpf_skb_store_bytes(skb, dns_off, &reply, sizeof(reply), 0))
		return TC_ACT_SHOT;

	__u32 udp_len = new_len - l4;
	struct udphdr u = {.source = dport, .dest = sport, .len = bpf_htons(udp_len), .check = 0};
	if (bpf_skb_store_bytes(skb, l4, &u, sizeof(u), 0))
		return TC_ACT_SHOT;

	if (v6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return TC_ACT_SHOT;
		ip6.saddr = ph.saddr;
		ip6.daddr = ph.daddr;
		ip6.payload_len = bpf_htons(udp_len);
		ip6.hop_limit = 64;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0))
			return TC_ACT_SHOT;
		ph.len = bpf_htonl(udp_len);
		BOUND(udp_len, 0x3ff);
		if (udp6_checksum(skb, sc, l4, udp_len, &ph))
			return TC_ACT_SHOT;
	} else {
		__u32 saddr = ip4.saddr;
		ip4.saddr = ip4.daddr;
		ip4.daddr = saddr;
		ip4.tot_len = bpf_htons(new_len - ETH_HLEN);
		ip4.ttl = 64;
		ip4.check = 0;
		ip4.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip4, sizeof(ip4), 0));
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip4, sizeof(ip4), 0))
			return TC_ACT_SHOT;
	}

	struct ethhdr e;
	__u8 mac[ETH_ALEN];
	if (bpf_skb_load_bytes(skb, 0, &e, sizeof(e)))
		return TC_ACT_SHOT;
	__builtin_memcpy(mac, e.h_source, ETH_ALEN);
	__builtin_memcpy(e.h_source, e.h_dest, ETH_ALEN);
	__builtin_memcpy(e.h_dest, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &e, sizeof(e), 0))
		return TC_ACT_SHOT;

	count(val ? NODED_DNS_STAT_ANSWERED : NODED_DNS_STAT_CACHED);
	return bpf_redirect(skb->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
