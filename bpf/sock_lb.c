// SPDX-License-Identifier: GPL-2.0
/* Socket-level service load balancing on cgroup hooks.
 *
 * connect4/6 translate a service VIP to a backend before the socket exists on
 * the wire (TCP and connected UDP); sendmsg4/6 do the same per datagram for
 * unconnected UDP; recvmsg4/6 and getpeername4/6 turn the backend back into
 * the VIP so the application only ever sees the address it asked for.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "noded_maps.h"
#include "noded_select.h"

#define ECONNREFUSED 111
#define NODED_TUNNEL_MARK 0x539	/* noded/redirect/rules.py TUNNEL_MARK: the tunnel's sockets */
#define NODED_TUNNEL_MARK_MASK 0xfff

enum lb_verdict {
	LB_PASS,	/* not a service: leave the address alone */
	LB_REJECT,	/* a service with no usable backend */
	LB_TRANSLATED,
};

/* Look the frontend in key up and choose a backend for it (noded_select.h; affinity by netns). */
static __always_inline enum lb_verdict
lb_select(struct bpf_sock_addr *ctx, struct noded_svc_key *key,
	  struct noded_backend **chosen, __u32 *svc_id)
{
	struct noded_svc_val *svc;
	struct noded_backend *be;
	__u32 backend_id;

	key->slot = 0;
	svc = bpf_map_lookup_elem(&noded_svc, key);
	if (!svc)
		return LB_PASS;
	*svc_id = svc->svc_id;
	struct noded_affinity_key akey = {
		.netns_cookie = svc->affinity_timeout ? bpf_get_netns_cookie(ctx) : 0,
		.svc_id = svc->svc_id,
	};
	backend_id = noded_pick_backend(key, svc, &akey);
	if (!backend_id)
		return LB_REJECT;
	be = bpf_map_lookup_elem(&noded_backends, &backend_id);
	if (!be)
		return LB_REJECT;
	*chosen = be;
	return LB_TRANSLATED;
}

static __always_inline void
lb_remember_vip(struct bpf_sock_addr *ctx, const struct noded_backend *be,
		const __u32 vip[4], __u16 vip_port, __u32 svc_id)
{
	struct noded_revnat_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = be->port,
	};
	struct noded_revnat_val rval = { .port = vip_port, .svc_id = svc_id };

	__builtin_memcpy(rkey.addr, be->addr, sizeof(rkey.addr));
	__builtin_memcpy(rval.addr, vip, sizeof(rval.addr));
	bpf_map_update_elem(&noded_revnat, &rkey, &rval, BPF_ANY);
}

static __always_inline int lb_proto_ok(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_TCP) {
		struct bpf_sock *sk = ctx->sk;
		if (sk && (sk->mark & NODED_TUNNEL_MARK_MASK) == NODED_TUNNEL_MARK)
			return 1;	/* the tunnel's own socket (its dial to a LB IP, a node port): translated */
		__u64 netns = bpf_get_netns_cookie(ctx);
		return !bpf_map_lookup_elem(&noded_mesh_netns, &netns);	/* a mesh pod's: its capture resolves it */
	}
	return ctx->protocol == IPPROTO_UDP;
}

static __always_inline void key_from_ip4(struct noded_svc_key *key, __u32 ip4)
{
	key->addr[0] = 0;
	key->addr[1] = 0;
	key->addr[2] = bpf_htonl(0xffff);
	key->addr[3] = ip4;
}

static __always_inline int is_mapped_ip4(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

/* Translate the destination of an IPv4 socket; 1 lets the call go on. */
static __always_inline int lb4_translate(struct bpf_sock_addr *ctx)
{
	struct noded_svc_key key = {};
	struct noded_backend *be = NULL;
	__u32 svc_id = 0;

	if (!lb_proto_ok(ctx))
		return 1;
	key_from_ip4(&key, ctx->user_ip4);
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	switch (lb_select(ctx, &key, &be, &svc_id)) {
	case LB_PASS:
		return 1;
	case LB_REJECT:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		break;
	}
	if (!is_mapped_ip4(be->addr))
		return 1;
	lb_remember_vip(ctx, be, key.addr, key.port, svc_id);
	ctx->user_ip4 = be->addr[3];
	ctx->user_port = be->port;
	return 1;
}

static __always_inline int lb6_translate(struct bpf_sock_addr *ctx)
{
	struct noded_svc_key key = {};
	struct noded_backend *be = NULL;
	__u32 svc_id = 0;

	if (!lb_proto_ok(ctx))
		return 1;
	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	switch (lb_select(ctx, &key, &be, &svc_id)) {
	case LB_PASS:
		return 1;
	case LB_REJECT:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		break;
	}
	lb_remember_vip(ctx, be, key.addr, key.port, svc_id);
	ctx->user_ip6[0] = be->addr[0];
	ctx->user_ip6[1] = be->addr[1];
	ctx->user_ip6[2] = be->addr[2];
	ctx->user_ip6[3] = be->addr[3];
	ctx->user_port = be->port;
	return 1;
}

/* The VIP a socket asked for, given the backend it really talks to. */
static __always_inline struct noded_revnat_val *
lb_vip_of(struct bpf_sock_addr *ctx, const __u32 addr[4])
{
	struct noded_revnat_key rkey = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = (__u16)ctx->user_port,
	};

	__builtin_memcpy(rkey.addr, addr, sizeof(rkey.addr));
	return bpf_map_lookup_elem(&noded_revnat, &rkey);
}

static __always_inline int lb4_reverse(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = { 0, 0, bpf_htonl(0xffff), ctx->user_ip4 };
	struct noded_revnat_val *vip = lb_vip_of(ctx, addr);

	if (vip) {
		ctx->user_ip4 = vip->addr[3];
		ctx->user_port = vip->port;
	}
	return 1;
}

static __always_inline int lb6_reverse(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct noded_revnat_val *vip = lb_vip_of(ctx, addr);

	if (vip) {
		ctx->user_ip6[0] = vip->addr[0];
		ctx->user_ip6[1] = vip->addr[1];
		ctx->user_ip6[2] = vip->addr[2];
		ctx->user_ip6[3] = vip->addr[3];
		ctx->user_port = vip->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int noded_connect4(struct bpf_sock_addr *ctx) { return lb4_translate(ctx); }

SEC("cgroup/sendmsg4")
int noded_sendmsg4(struct bpf_sock_addr *ctx) { return lb4_translate(ctx); }

SEC("cgroup/recvmsg4")
int noded_recvmsg4(struct bpf_sock_addr *ctx) { return lb4_reverse(ctx); }

SEC("cgroup/getpeername4")
int noded_getpeername4(struct bpf_sock_addr *ctx) { return lb4_reverse(ctx); }

SEC("cgroup/connect6")
int noded_connect6(struct bpf_sock_addr *ctx) { return lb6_translate(ctx); }

SEC("cgroup/sendmsg6")
int noded_sendmsg6(struct bpf_sock_addr *ctx) { return lb6_translate(ctx); }

SEC("cgroup/recvmsg6")
int noded_recvmsg6(struct bpf_sock_addr *ctx) { return lb6_reverse(ctx); }

SEC("cgroup/getpeername6")
int noded_getpeername6(struct bpf_sock_addr *ctx) { return lb6_reverse(ctx); }

char LICENSE[] SEC("license") = "GPL";
