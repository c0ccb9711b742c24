// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* Benchmark programs, loaded only by the benchmarks. BPF_PROG_TEST_RUN
 * reuses one skb across repetitions, so a program that changes the ports
 * before calling the datapath makes every repetition a new flow while the
 * loop stays in the kernel. bump_only is its baseline. */
#include "datapath.c"

#define PORTS_OFF (ETH_HLEN + 20) /* IPv4 without options */

static __always_inline int bump(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 *ports = data + PORTS_OFF;

	if ((void *)(ports + 1) > end)
		return -1;
	/* sport and dport together as one 32-bit counter: 4 billion flows
	 * before one repeats. Port 0 is skipped by the rule, not here. */
	*ports = bpf_htonl(bpf_ntohl(*ports) + 1);
	return 0;
}

SEC("tc")
int bench_new_flow(struct __sk_buff *skb)
{
	if (bump(skb))
		return TC_ACT_SHOT;
	return handle(skb, SCOPE_EGRESS);
}

SEC("tc")
int bench_bump_only(struct __sk_buff *skb)
{
	if (bump(skb))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* bench_new_flow_warm decides the same packet as a new flow every time:
 * after the datapath ran, it marks the flow's entries expired, so the next run finds
 * the entry stale and decides and inserts afresh. Unlike bench_new_flow the
 * tables stay in cache, so the two bracket the cost of a first packet.
 * Replacing a stale entry costs the LRU a little more than filling a free
 * one. expire_only is its baseline: the same lookup and write, and no
 * datapath. */
static __always_inline void expire_in(struct hook_ep *h, struct ct_key *k, const __u8 kscope)
{
	struct ct_value *v;
	void *t;

	hook_open(h);
	t = ct_table(h, kscope);
	v = t ? bpf_map_lookup_elem(t, k) : NULL;
	if (v)
		v->expires = 0;
}

static __always_inline int expire(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u16 *ports = data + PORTS_OFF;
	struct ct_key k = { .proto = IPPROTO_TCP, .scope = SCOPE_EGRESS };
	struct hook_ep h = { .ifindex = skb->ifindex }, dh = {};
	struct local_pod *lp;

	if ((void *)(ports + 2) > end)
		return -1;
	k.saddr[10] = k.saddr[11] = k.daddr[10] = k.daddr[11] = 0xff;
	__builtin_memcpy(&k.saddr[12], &ip->saddr, 4);
	__builtin_memcpy(&k.daddr[12], &ip->daddr, 4);
	k.sport = bpf_ntohs(ports[0]);
	k.dport = bpf_ntohs(ports[1]);
	h.ep = bpf_map_lookup_elem(&endpoints, &h.ifindex);
	expire_in(&h, &k, SCOPE_EGRESS);
	/* and the destination's entry, in its own table, where from_pod
	 * checked a local pod */
	lp = bpf_map_lookup_elem(&local_pods, k.daddr);
	if (!lp)
		return 0;
	dh.ifindex = lp->ifindex;
	dh.ep = bpf_map_lookup_elem(&endpoints, &dh.ifindex);
	k.scope = SCOPE_INGRESS;
	expire_in(&dh, &k, SCOPE_INGRESS);
	return 0;
}

SEC("tc")
int bench_new_flow_warm(struct __sk_buff *skb)
{
	int ret = handle(skb, SCOPE_EGRESS);

	if (expire(skb))
		return TC_ACT_SHOT;
	return ret;
}

SEC("tc")
int bench_expire_only(struct __sk_buff *skb)
{
	if (expire(skb))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* bench_service decides the same packet to a Service frontend every time:
 * the translation rewrites its destination, so it puts the headers back
 * after the datapath ran. They are kept in a global: the datapath's stack
 * leaves no room. restore_only is its baseline. */
#define SAVED_LEN (ETH_HLEN + 20 + 20) /* IPv4 and TCP without options */
__u8 saved[SAVED_LEN];

SEC("tc")
int bench_service(struct __sk_buff *skb)
{
	int ret;

	if (bpf_skb_load_bytes(skb, 0, saved, SAVED_LEN))
		return TC_ACT_SHOT;
	ret = handle(skb, SCOPE_EGRESS);
	if (bpf_skb_store_bytes(skb, 0, saved, SAVED_LEN, 0))
		return TC_ACT_SHOT;
	return ret;
}

SEC("tc")
int bench_restore_only(struct __sk_buff *skb)
{
	if (bpf_skb_load_bytes(skb, 0, saved, SAVED_LEN) || bpf_skb_store_bytes(skb, 0, saved, SAVED_LEN, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
