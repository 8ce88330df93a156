/* The DNS fast path's maps: the records it answers and the addresses it
 * answers on. Mirrored once in noded/bpf/structs.py (checked against BTF). */
#ifndef NODED_DNS_H
#define NODED_DNS_H

#include <linux/types.h>

#define NODED_DNS_NAME_MAX  128	/* wire-format name, lowercased, zero-padded */
#define NODED_DNS_ADDRS_MAX 8	/* more addresses: left to userspace */
#define NODED_DNS_MAP_SIZE  65536
#define NODED_DNS_STAT_ANSWERED 0
#define NODED_DNS_STAT_PASSED   1

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

struct noded_dns_listen_key {
	__u32 addr;		/* IPv4, network order */
	__u16 port;		/* network order */
	__u16 pad;
};

#endif
