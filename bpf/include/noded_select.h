/* Backend selection, shared by the socket LB (sock_lb.c) and the external entry points (nodeport.c):
 * a still-valid session-affinity entry first (kept fresh; a terminating backend only while none is
 * ready), else a random slot among the ready backends (the serving-terminating ones when none is
 * ready), remembered for affinity. The callers differ only in who the client is: the socket LB keys
 * affinity by network namespace, the entry points by client address (NODED_AFFINITY_BY_ADDRESS). */
#ifndef NODED_SELECT_H
#define NODED_SELECT_H

#include "noded_maps.h"

/* The chosen backend's id for the frontend whose master entry is svc (key: that frontend, any slot);
 * 0 when it has none to give. */
static __always_inline __u32 noded_pick_backend(struct noded_svc_key *key, const struct noded_svc_val *svc,
						struct noded_affinity_key *akey)
{
	__u32 count = svc->ready ? svc->ready : svc->terminating;
	struct noded_affinity_val aval = {}, *aff;
	struct noded_backend *be;
	struct noded_svc_val *slot;
	__u64 now = 0;

	if (!count)
		return 0;
	if (svc->affinity_timeout) {
		now = bpf_ktime_get_ns();
		aff = bpf_map_lookup_elem(&noded_affinity, akey);
		if (aff && now - aff->last_used_ns <= (__u64)svc->affinity_timeout * NODED_SEC) {
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
		bpf_map_update_elem(&noded_affinity, akey, &aval, BPF_ANY);
	}
	return slot->backend_id;
}

#endif
