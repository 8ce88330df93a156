/* The maps every noded BPF object shares, defined once. Each object that
 * includes this declares them all; pinned by name under the instance's bpffs
 * path, libbpf reuses the one map whichever object loads first. */
#ifndef NODED_MAPS_H
#define NODED_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "noded_lb.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_SVC_MAP_SIZE);
	__type(key, struct noded_svc_key);
	__type(value, struct noded_svc_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_BACKEND_MAP_SIZE);
	__type(key, __u32);
	__type(value, struct noded_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NODED_REVNAT_MAP_SIZE);
	__type(key, struct noded_revnat_key);
	__type(value, struct noded_revnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NODED_AFFINITY_MAP_SIZE);
	__type(key, struct noded_affinity_key);
	__type(value, struct noded_affinity_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NODED_NAT_MAP_SIZE);
	__type(key, struct noded_nat_key);
	__type(value, struct noded_nat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NODED_NAT_NEW_MAP_SIZE);
	__type(key, struct noded_nat_key);
	__type(value, struct noded_nat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_nat_new SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NODED_CIDR_MAP_SIZE);
	__type(key, struct noded_cidr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_cluster_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_SOCK_TERM_MAP_SIZE);
	__type(key, struct noded_term_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_sock_term SEC(".maps");

/* The network namespaces (cookies) of mesh pods: their TCP connects keep the VIP, so that the capture
 * listener sees the Service the pod asked for (the tunnel resolves it, and a waypoint is chosen by it), as
 * Cilium's socket LB stays out of pods for Istio ambient. Their UDP is translated as any pod's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODED_MESH_NETNS_MAP_SIZE);
	__type(key, __u64);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} noded_mesh_netns SEC(".maps");

#endif
