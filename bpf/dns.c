// SPDX-License-Identifier: GPL-2.0
/* The DNS fast path: a tc ingress program on the interfaces facing this
 * node's pods (their bridge) that answers A and AAAA queries for cluster
 * names straight from noded_dns, a map noded keeps in step with the model.
 *
 * Only the plainest queries are answered here: IPv4, UDP to a node-local
 * DNS address (noded_dns_listen), a standard query with one IN question
 * of at most NODED_DNS_NAME_MAX bytes, nothing else but at most one EDNS0
 * OPT of version 0. The packet is turned into the reply in place (header,
 * question as the client wrote it, the answers, an OPT if the query had
 * one) and sent back out the interface it came in on. Everything else —
 * a miss, another type, a name with no address — passes to the stack,
 * where the userspace resolver answers it; the two give the same answers.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_dns.h"

#define DNS_OFF    (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr))
#define QNAME_OFF  (DNS_OFF + 12)
#define SCRATCH    (NODED_DNS_NAME_MAX + 4 + 11)	/* name, type and class, an OPT record */
#define OPT_LEN    11
#define TYPE_A     1
#define TYPE_AAAA  28
#define TYPE_OPT   41

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_DNS_MAP_SIZE);
	__type(key, struct noded_dns_key);
	__type(value, struct noded_dns_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct noded_dns_listen_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns_listen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_dns_stats SEC(".maps");

/* per-CPU scratch: the lookup key and the bytes after the header, too big for the stack together */
struct scratch {
	struct noded_dns_key key;
	__u8 buf[256];		/* SCRATCH used; the length read is masked to 0xff for the verifier */
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

static __always_inline int pass(void)
{
	__u32 k = NODED_DNS_STAT_PASSED;
	__u64 *n = bpf_map_lookup_elem(&noded_dns_stats, &k);

	if (n)
		*n += 1;
	return TC_ACT_OK;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

SEC("tc")
int noded_dns_fast(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp = data + ETH_HLEN + sizeof(*ip);
	struct dns_header *h = data + DNS_OFF;
	struct noded_dns_listen_key lk = {};
	struct noded_dns_val *val;
	struct scratch *sc;
	__u32 total, name_len = 0, i, zero = 0;

	if ((void *)(h + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	lk.addr = ip->daddr;
	lk.port = udp->dest;
	if (!bpf_map_lookup_elem(&noded_dns_listen, &lk))
		return TC_ACT_OK;
	/* a standard query (QR=0, opcode 0, not truncated), one question, no answers */
	if ((h->flags1 & 0xfa) || h->qdcount != bpf_htons(1) || h->ancount || h->nscount ||
	    bpf_ntohs(h->arcount) > 1)
		return pass();
	sc = bpf_map_lookup_elem(&noded_dns_scratch, &zero);
	if (!sc)
		return pass();
	__u8 *buf = sc->buf;
	struct noded_dns_key *key = &sc->key;
	__builtin_memset(key, 0, sizeof(*key));
	total = skb->len - QNAME_OFF;
	if (skb->len < QNAME_OFF + 5 || bpf_ntohs(udp->len) != skb->len - ETH_HLEN - sizeof(*ip))
		return pass();
	__u32 want = total < SCRATCH ? total : SCRATCH;
	/* in 1..256 for the verifier (clang knows 5 <= want <= SCRATCH and would drop a plain mask) */
	asm volatile("%0 += -1; %0 &= 0xff; %0 += 1" : "+r"(want));
	if (bpf_skb_load_bytes(skb, QNAME_OFF, buf, want))
		return pass();

	/* the name, lowercased, until its root label (bpf_loop: verified once, not per byte) */
	struct name_walk w = {.sc = sc};
	bpf_loop(NODED_DNS_NAME_MAX, walk_name, &w, 0);
	if (w.bad)
		return pass();
	name_len = w.name_len;
	if (!name_len || name_len + 4 > total || name_len > NODED_DNS_NAME_MAX)
		return pass();
	key->qtype = (buf[name_len] << 8) | buf[name_len + 1];
	if ((key->qtype != TYPE_A && key->qtype != TYPE_AAAA) || buf[name_len + 2] != 0 || buf[name_len + 3] != 1)
		return pass();

	/* what follows the question: nothing, or one OPT of version 0 and nothing after it */
	__u32 rest = total - name_len - 4;
	__u8 edns = h->arcount != 0;
	if (edns) {
		__u8 *opt = buf + name_len + 4;
		if (rest < OPT_LEN || opt[0] != 0 || opt[1] != 0 || opt[2] != TYPE_OPT || opt[6] != 0 ||
		    rest != OPT_LEN + ((opt[9] << 8) | opt[10]))
			return pass();
	} else if (rest) {
		return pass();
	}

	val = bpf_map_lookup_elem(&noded_dns, key);
	if (!val || val->count == 0 || val->count > NODED_DNS_ADDRS_MAX)
		return pass();

	/* the reply, in place */
	__u32 count = val->count, rdlen = key->qtype == TYPE_A ? 4 : 16;
	__u32 rr_len = 12 + rdlen;
	__u32 answers = QNAME_OFF + name_len + 4;
	__u32 new_len = answers + count * rr_len + (edns ? OPT_LEN : 0);
	__u8 flags1 = 0x84 | (h->flags1 & 0x01);	/* QR AA, RD as asked */
	__u16 id = h->id;
	__u8 mac[ETH_ALEN];
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 sport = udp->source, dport = udp->dest;

	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	if (bpf_skb_change_tail(skb, new_len, 0))
		return pass();

	struct dns_rr rr = {
		.name = bpf_htons(0xc00c),
		.type = bpf_htons(key->qtype),
		.class = bpf_htons(1),
		.ttl_hi = bpf_htons(val->ttl >> 16),
		.ttl_lo = bpf_htons(val->ttl & 0xffff),
		.rdlen = bpf_htons(rdlen),
	};
	for (i = 0; i < NODED_DNS_ADDRS_MAX; i++) {
		if (i >= count)
			break;
		__builtin_memcpy(rr.rdata, val->addr[i], 16);
		if (bpf_skb_store_bytes(skb, answers + i * rr_len, &rr, key->qtype == TYPE_A ? 16 : 28, 0))
			return TC_ACT_SHOT;
	}
	if (edns) {
		__u8 opt[OPT_LEN] = {0, 0, TYPE_OPT, 0x04, 0xd0};	/* root, OPT, payload 1232, no flags */
		if (bpf_skb_store_bytes(skb, new_len - OPT_LEN, opt, OPT_LEN, 0))
			return TC_ACT_SHOT;
	}

	struct dns_header reply = {
		.id = id,
		.flags1 = flags1,
		.flags2 = 0x80,	/* RA */
		.qdcount = bpf_htons(1),
		.ancount = bpf_htons(count),
		.arcount = bpf_htons(edns),
	};
	if (bpf_skb_store_bytes(skb, DNS_OFF, &reply, sizeof(reply), 0))
		return TC_ACT_SHOT;

	struct udphdr u = {
		.source = dport,
		.dest = sport,
		.len = bpf_htons(new_len - ETH_HLEN - sizeof(struct iphdr)),
		.check = 0,	/* optional over IPv4 */
	};
	if (bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &u, sizeof(u), 0))
		return TC_ACT_SHOT;

	struct iphdr iph;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)))
		return TC_ACT_SHOT;
	iph.saddr = daddr;
	iph.daddr = saddr;
	iph.tot_len = bpf_htons(new_len - ETH_HLEN);
	iph.ttl = 64;
	iph.check = 0;
	iph.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&iph, sizeof(iph), 0));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &iph, sizeof(iph), 0))
		return TC_ACT_SHOT;

	struct ethhdr e;
	if (bpf_skb_load_bytes(skb, 0, &e, sizeof(e)))
		return TC_ACT_SHOT;
	__builtin_memcpy(e.h_source, e.h_dest, ETH_ALEN);
	__builtin_memcpy(e.h_dest, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &e, sizeof(e), 0))
		return TC_ACT_SHOT;

	__u32 k = NODED_DNS_STAT_ANSWERED;
	__u64 *n = bpf_map_lookup_elem(&noded_dns_stats, &k);
	if (n)
		*n += 1;
	return bpf_redirect(skb->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
