/* The DNS fast path's maps: the cluster records it answers, the external answers the resolver learned
 * (the in-kernel cache) and the addresses it answers on. Mirrored once in noded/bpf/structs.py (checked
 * against BTF). */
#ifndef NODED_DNS_H
#define NODED_DNS_H

#include <linux/types.h>

#define NODED_DNS_NAME_MAX   128	/* wire-format name, lowercased, zero-padded */
#define NODED_DNS_ADDRS_MAX  8		/* more addresses: left to userspace */
#define NODED_DNS_MAP_SIZE   65536
#define NODED_DNS_CACHE_SIZE 8192	/* LRU: the least recently answered entry goes first */
#define NODED_DNS_CACHE_DATA 512	/* the sections after the question; longer answers stay in userspace */
#define NODED_DNS_CACHE_TTLS 16		/* records whose TTL is aged; more records: left to userspace */
#define NODED_DNS_LISTEN_SIZE 64

/* noded_dns_stats' keys (in BTF through dns.c's scratch struct; mirrored in noded/bpf/structs.py) */
enum noded_dns_stat : __u32 {
	NODED_DNS_STAT_ANSWERED = 0,	/* cluster names answered from noded_dns */
	NODED_DNS_STAT_PASSED = 1,	/* queries to a served address left to userspace */
	NODED_DNS_STAT_CACHED = 2,	/* external names answered from noded_dns_cache */
	NODED_DNS_STAT_EXPIRED = 3,	/* cache entries found expired (deleted, the query passed) */
	NODED_DNS_STATS = 4,		/* how many */
};

struct noded_dns_key {
	__u16 qtype;		/* 1 (A) or 28 (AAAA), host order */
	__u16 pad;
	__u8  name[NODED_DNS_NAME_MAX];
};

struct noded_dns_val {
	__u32 ttl;
	__u32 count;		/* 1..NODED_DNS_ADDRS_MAX */
	__u8  addr[NODED_DNS_ADDRS_MAX][16];	/* A: the first 4 bytes */
};

/* One answer the resolver got upstream, as it would write it after the question (answer, authority and
 * additional records, names compressed against the question at offset 12), with where each record's TTL
 * sits so the program can age it: TTL - whole seconds since stored_ns, as the userspace cache does. */
struct noded_dns_cached {
	__u64 stored_ns;	/* CLOCK_MONOTONIC (bpf_ktime_get_ns) when the answer was learned */
	__u64 expires_ns;	/* never served at or after this */
	__u16 len;		/* bytes of data used, 0..NODED_DNS_CACHE_DATA */
	__u8  flags2;		/* the reply's second flag byte: RA, AD, rcode */
	__u8  nttl;		/* entries of ttl_off used */
	__u16 ancount;
	__u16 nscount;
	__u16 arcount;
	__u16 pad;
	__u16 ttl_off[NODED_DNS_CACHE_TTLS];	/* offsets in data of each record's 4-byte TTL */
	__u8  data[NODED_DNS_CACHE_DATA];
};

struct noded_dns_listen_key {
	__u8  addr[16];		/* IPv6, or IPv4 mapped (::ffff:a.b.c.d), network order */
	__u16 port;		/* network order */
	__u16 pad;
};

#endif
