// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* The floor of a stateful datapath, loaded only by netbench -nodes
 * (configurations floor-*). It does the least any datapath must do that
 * enforces policy by connection, as idcni does, on the fast path between
 * two nodes' pods: one conntrack lookup per packet (and the reply's
 * second one when the first misses), one insert per new connection on
 * each node, and the forwarding past the node's IP stack that idcni's
 * from_pod and from_net do (kept next hop, TTL, redirect). It decides
 * nothing: no identity, no policy, no events, no counters but one. What
 * it costs over bare routing is what keeping state costs on the machine,
 * the lowest ratio to bare any such datapath can have there. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "idcni.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

#define AF_INET_ 2 /* linux/socket.h's, which BPF programs cannot include */
#define NSEC 1000000000ULL
/* As datapath.c's NEXTHOP_FOR: the kept FIB answer serves a second, in
 * the units of struct nexthop's asked (2^20 ns). */
#define NEXTHOP_FOR 1000

/* What netbench tells a node's floor: its pod (host veth, the Ethernet
 * header a packet delivered to it carries, its address) and the other
 * node's pod range. */
struct floor_config {
	__u32 pod_ifindex;
	__u8 pod_mac[6];
	__u8 host_mac[6];
	__u32 pod_addr; /* network byte order */
	__u32 remote_net;
	__u32 remote_mask;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 8192);
} floor_ct_out SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 8192);
} floor_ct_in SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct floor_config);
	__uint(max_entries, 1);
} floor_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct nexthop); /* idcni's, kept as remote_cidrs keeps it */
	__uint(max_entries, 1);
} floor_nexthop SEC(".maps");

/* Packets the floor sent past the stack: netbench's proof it ran. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} floor_passed SEC(".maps");

struct tuple {
	struct iphdr *ip;
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 flags;
};

static __always_inline int parse(struct __sk_buff *skb, struct tuple *t)
{
	void *data, *end;
	struct ethhdr *eth;
	struct tcphdr *tcp;

	if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr)))
		return -1;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	eth = data;
	t->ip = data + ETH_HLEN;
	tcp = (void *)(t->ip + 1);
	if ((void *)(tcp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || t->ip->ihl != 5 ||
	    t->ip->protocol != IPPROTO_TCP || t->ip->ttl <= 1)
		return -1;
	t->saddr = t->ip->saddr;
	t->daddr = t->ip->daddr;
	t->sport = bpf_ntohs(tcp->source);
	t->dport = bpf_ntohs(tcp->dest);
	t->flags = ((__u8 *)tcp)[13];
	return 0;
}

static __always_inline void key_set(struct ct_key *k, __u32 s, __u32 d, __u16 sport, __u16 dport, __u8 scope)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr[10] = k->saddr[11] = k->daddr[10] = k->daddr[11] = 0xff;
	__builtin_memcpy(&k->saddr[12], &s, 4);
	__builtin_memcpy(&k->daddr[12], &d, 4);
	k->sport = sport;
	k->dport = dport;
	k->proto = IPPROTO_TCP;
	k->scope = scope;
}

/* track is the state a stateful datapath cannot do without: the flow's
 * entry, or its reply's, or a new one for a bare SYN. 0: known or
 * created; -1: neither (the stack takes it). */
static __always_inline int track(struct tuple *t, void *table, void *other, __u8 scope)
{
	struct ct_key k;
	struct ct_value v = {};

	key_set(&k, t->saddr, t->daddr, t->sport, t->dport, scope);
	if (bpf_map_lookup_elem(table, &k))
		return 0;
	if ((t->flags & 0x12) == 0x02) {
		v.expires = bpf_ktime_get_coarse_ns() + 60 * NSEC;
		return bpf_map_update_elem(table, &k, &v, BPF_ANY) ? -1 : 0;
	}
	key_set(&k, t->daddr, t->saddr, t->dport, t->sport, scope ^ 1);
	return bpf_map_lookup_elem(other, &k) ? 0 : -1;
}

static __always_inline int hop(struct __sk_buff *skb, struct tuple *t, const __u8 *mac)
{
	__u16 old, new;

	__builtin_memcpy(&old, &t->ip->ttl, 2);
	new = old - 1; /* the TTL is the first byte of the word, in network order */
	if (bpf_skb_store_bytes(skb, 0, mac, 12, 0) ||
	    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &new, 2, 0))
		return -1;
	return 0;
}

static __always_inline void passed(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&floor_passed, &zero);

	if (n)
		(*n)++;
}

SEC("tc")
int floor_from_pod(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	struct floor_config *cfg;
	struct nexthop *nh;
	struct tuple t;
	__u32 zero = 0, asked;

	cfg = bpf_map_lookup_elem(&floor_config, &zero);
	nh = bpf_map_lookup_elem(&floor_nexthop, &zero);
	if (!cfg || !nh || parse(skb, &t) || (t.daddr & cfg->remote_mask) != cfg->remote_net)
		return TC_ACT_OK;
	if (track(&t, &floor_ct_out, &floor_ct_in, 0))
		return TC_ACT_OK;
	asked = bpf_ktime_get_coarse_ns() >> 20;
	if (!nh->ifindex || asked - nh->asked >= NEXTHOP_FOR) {
		fib.family = AF_INET_;
		fib.ifindex = skb->ifindex;
		fib.ipv4_src = t.saddr;
		fib.ipv4_dst = t.daddr;
		if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
			return TC_ACT_OK;
		__builtin_memcpy(nh->dmac, fib.dmac, 6);
		__builtin_memcpy(nh->smac, fib.smac, 6);
		nh->ifindex = fib.ifindex;
		nh->asked = asked;
	}
	if (hop(skb, &t, nh->dmac))
		return TC_ACT_SHOT;
	passed();
	return bpf_redirect(nh->ifindex, 0);
}

SEC("tc")
int floor_from_net(struct __sk_buff *skb)
{
	struct floor_config *cfg;
	struct tuple t;
	__u32 zero = 0;
	__u8 mac[12];

	cfg = bpf_map_lookup_elem(&floor_config, &zero);
	if (!cfg || parse(skb, &t) || t.daddr != cfg->pod_addr || (t.saddr & cfg->remote_mask) != cfg->remote_net)
		return TC_ACT_OK;
	if (track(&t, &floor_ct_in, &floor_ct_out, 1))
		return TC_ACT_OK;
	__builtin_memcpy(mac, cfg->pod_mac, 6);
	__builtin_memcpy(mac + 6, cfg->host_mac, 6);
	if (hop(skb, &t, mac))
		return TC_ACT_SHOT;
	passed();
	return bpf_redirect_peer(cfg->pod_ifindex, 0);
}
