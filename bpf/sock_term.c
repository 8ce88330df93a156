// SPDX-License-Identifier: GPL-2.0
/* Socket termination: the socket iterators that destroy sockets the socket-LB
 * connected to a backend their service no longer has.
 *
 * connect4/6 rewrite a connected socket's destination once; nothing revisits
 * it. After a sync removes backends, userspace writes them to noded_sock_term
 * (svc_id, address, port, protocol) and reads these iterators once in every
 * network namespace whose processes sit in noded's cgroup. A socket whose
 * destination is such a backend *and* whose noded_revnat entry says the
 * socket-LB chose it for that svc_id is destroyed with bpf_sock_destroy()
 * (Linux 6.5): a UDP client gets ECONNABORTED and connects again, to a current
 * backend; a TCP one a reset. Sockets that dialed a pod address themselves
 * are never touched.
 *
 * The kernel structs are declared here with only the fields read, relocated
 * against the running kernel's BTF (CO-RE).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_maps.h"

#define AF_INET  2
#define AF_INET6 10
#define TCP_LISTEN 10

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct udp_sock;

struct bpf_iter_meta;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

static __always_inline void term_if_stale(struct sock_common *sk, __u8 proto)
{
	struct noded_term_key key = {};
	struct noded_revnat_key rkey = {};
	struct noded_revnat_val *vip;
	__u32 *destroyed;

	if (sk->skc_family == AF_INET) {
		key.addr[2] = bpf_htonl(0xffff);
		key.addr[3] = sk->skc_daddr;
		if (!key.addr[3])
			return;
	} else if (sk->skc_family == AF_INET6) {
		key.addr[0] = sk->skc_v6_daddr.in6_u.u6_addr32[0];
		key.addr[1] = sk->skc_v6_daddr.in6_u.u6_addr32[1];
		key.addr[2] = sk->skc_v6_daddr.in6_u.u6_addr32[2];
		key.addr[3] = sk->skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		return;
	}
	key.port = sk->skc_dport;
	if (!key.port)
		return;	/* not connected */
	key.proto = proto;

	rkey.cookie = bpf_get_socket_cookie(sk);
	__builtin_memcpy(rkey.addr, key.addr, sizeof(rkey.addr));
	rkey.port = key.port;
	vip = bpf_map_lookup_elem(&noded_revnat, &rkey);
	if (!vip)
		return;	/* not a socket the socket-LB translated */
	key.svc_id = vip->svc_id;
	destroyed = bpf_map_lookup_elem(&noded_sock_term, &key);
	if (!destroyed)
		return;
	if (bpf_sock_destroy(sk) == 0)
		__sync_fetch_and_add(destroyed, 1);
}

SEC("iter/udp")
int noded_term_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;

	if (sk)
		term_if_stale(sk, IPPROTO_UDP);
	return 0;
}

SEC("iter/tcp")
int noded_term_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;

	if (sk && sk->skc_state != TCP_LISTEN)
		term_if_stale(sk, IPPROTO_TCP);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
