// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* idcni datapath: two TC programs on every pod's host veth.
 *
 * from_pod runs on the veth's TC ingress (the packet leaves the pod) and
 * checks the pod's egress; to_pod runs on its TC egress (the packet enters
 * the pod) and checks the pod's ingress. Both decide by identity: the
 * endpoint map names the pod's own identity, the ipcache the peer's.
 * The rule book is DESIGN.md section 3; bpf/reference is the same logic
 * in Go, and the tests hold the two to each other. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "idcni.h"

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

char __license[] SEC("license") = "Dual MIT/GPL";

#define NSEC 1000000000ULL
#define CT_TIMEOUT_SYN (60 * NSEC)
#define CT_TIMEOUT_TCP (6 * 3600 * NSEC)
#define CT_TIMEOUT_CLOSE (10 * NSEC)
#define CT_TIMEOUT_OTHER (60 * NSEC)
/* Skip rewriting a live entry's deadline unless it moves this much: a
 * write per packet would bounce the entry's cache line between CPUs. */
#define CT_REFRESH_SLACK (1 * NSEC)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define IPPROTO_ICMPV6_ 58
#define MAX_IPV6_EXT 4
/* Enough linear bytes for Ethernet, IPv6 with a few extension headers and
 * the L4 header. */
#define PULL_LEN 128
#define EVENTS_WAKEUP_BYTES (64 * 1024)
/* Events per endpoint and window: one pod spraying drops cannot fill the
 * ring and hide every other pod's. What the limit holds back is counted
 * (event_loss) and told in the endpoint's next event. */
#define EVENTS_WINDOW (1 * NSEC)
#define EVENTS_PER_WINDOW 256
#define MAX_ENDPOINTS 16384
/* linux/socket.h's, which the bpf target cannot include */
#define AF_INET_ 2
#define AF_INET6_ 10

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* host veth ifindex */
	__type(value, struct endpoint);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* Pods on this node that from_pod delivers to directly, by address
 * (IPv4-mapped like the ipcache). Only the CNI plugin writes it: a pod
 * without an entry is reached through the node's routing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u8[16]);
	__type(value, struct local_pod);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} local_pods SEC(".maps");

/* Other nodes' pod ranges (IPv4-mapped like the ipcache), written by
 * the agent from the Nodes it routes to. Traffic between a local pod and
 * one of these skips the node's forwarding and netfilter in both
 * directions (from_pod's forward_remote, from_net); anything else, such
 * as a pod's traffic leaving the cluster, keeps going through the stack. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct remote_range);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} remote_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} identities SEC(".maps");

/* The node's shared conntrack table: both tables of slot 0. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

/* Conntrack tables, two per endpoint.ct_slot: at slot * 2 + scope, by the
 * scope of the keys they hold. An LRU table evicts its least recently
 * used entry when full, whoever owns it: in one shared table, a pod
 * opening a million flows pushed out other pods' idle connections, whose
 * replies then met policy as new flows. Each endpoint the plugin creates
 * gets tables of its own. Every lookup is for one endpoint's hook (a
 * reply is the reverse of a flow the same endpoint's other hook
 * admitted), so nothing needs another endpoint's table. The flows an
 * endpoint opened (keys of its egress scope) and the ones it admitted
 * (ingress scope) are apart: a flood the endpoint's ingress lets in
 * evicts only the flows it admitted, never a connection it opened, and a
 * flood it sends evicts only its own. */
struct ct_table {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, MAX_ENDPOINTS * 2);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct ct_table);
} ct_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ep_state);
	__uint(max_entries, MAX_ENDPOINTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ep_states SEC(".maps");

/* Services (ClusterIP frontends) a pod's new flows are translated from,
 * their backends by (frontend id, slot), and the backend each client of
 * a frontend with session affinity last went to. The Go side owns the
 * first two (bpf.PutService); the datapath keeps the third. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, REASON_MAX * 2);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

/* Events not sent, by reason * 2 + (0: the ring was full, 1: the
 * endpoint's rate limit held it back). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, REASON_MAX * 2);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_loss SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* struct __sk_buff points to these two. LLVM orders the BTF it makes for
 * the types it meets only through pointers by where they sit in its own
 * memory, which changes from one clang run to the next; declaring them
 * here first puts them in source order, so the object is reproducible
 * (scripts/check-generate.sh compares it byte for byte). */
const struct bpf_flow_keys *unused_flow_keys __attribute__((unused));
const struct bpf_sock *unused_sock __attribute__((unused));

/* Force the types into BTF so bpf2go emits them. */
const struct event *unused_event __attribute__((unused));
const enum reason *unused_reason __attribute__((unused));
const enum stat *unused_stat __attribute__((unused));
const enum scope *unused_scope __attribute__((unused));
const struct ep_state *unused_ep_state __attribute__((unused));

struct addr16 {
	__u32 w[4];
};

struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport; /* host byte order; ICMP echo id in both */
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 tcp_flags;
	__u8 ttl; /* or hop limit */
	/* An ICMP error (related): the flow it is about, from the packet it
	 * quotes, in the quoted packet's direction. */
	union {
		__u32 inner_saddr[4];
		/* what a Service translation changed (see xlated): a packet
		 * it translates is never related */
		__u32 orig_addr[4];
	};
	union {
		__u32 inner_daddr[4];
		struct addr16 pick_addr; /* the backend svc_new picked */
	};
	union {
		__u16 inner_sport;
		__u16 orig_port;
	};
	union {
		__u16 inner_dport;
		__u16 pick_port;
	};
	__u8 inner_proto;
	__u8 related;
	/* the ICMP echo reply of an echo request (a reply by its type) */
	__u8 echo_reply;
	/* a first fragment with more to come: frag_id's ports are recorded
	 * for its followers once the packet passes */
	__u8 frag_first;
	__u32 frag_id;
	/* where the L4 header starts; frag_later: a fragment without it */
	__u16 l4_off;
	__u8 frag_later;
	/* what a Service translation changed: 1 the destination, 2 the
	 * source; orig_addr:orig_port is what it was on the wire (for the
	 * fragment table, whose followers come as the pod sent them) */
	__u8 xlated;
};

enum parse_result {
	PARSE_OK,
	PARSE_NONIP,
	PARSE_ND,
	PARSE_MALFORMED,
	PARSE_FRAG_UNKNOWN,
};

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline void count(__u32 reason, __u8 scope, __u32 len)
{
	__u32 idx = reason * 2 + scope;
	struct counter *c = bpf_map_lookup_elem(&counters, &idx);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

static __always_inline int is_echo(__u8 family, __u8 proto, __u8 type)
{
	return (family == 4 && proto == IPPROTO_ICMP && (type == 8 || type == 0)) ||
	       (family == 6 && proto == IPPROTO_ICMPV6_ && (type == 128 || type == 129));
}

/* link_scoped reports whether an IPv6 address cannot leave the link: a
 * link-local unicast (fe80::/10) or a link-scope multicast (ff02::/16,
 * which holds all-nodes, all-routers, solicited-node and MLDv2 reports). */
static __always_inline int link_scoped(const __u32 *a)
{
	__u32 w = bpf_ntohl(a[0]);

	return (w & 0xffc00000) == 0xfe800000 || (w >> 16) == 0xff02;
}

/* parse_quoted reads the packet an ICMP error quotes (at q, l4len - 8
 * bytes by the outer header) into p's inner tuple. Only a quote whose IP
 * header and first 8 bytes of L4 header are in the linear data counts; a
 * shorter one leaves the packet a plain ICMP packet. */
static __always_inline void parse_quoted(struct pkt *p, __u8 *q, void *end, __u32 qlen)
{
	__u32 hlen;
	__u8 *l4;

	if (p->family == 4) {
		struct iphdr *ip = (struct iphdr *)q;

		if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
			return;
		hlen = ip->ihl * 4;
		if (qlen < hlen + 8 || (bpf_ntohs(ip->frag_off) & 0x1fff))
			return;
		p->inner_saddr[2] = bpf_htonl(0xffff);
		p->inner_saddr[3] = ip->saddr;
		p->inner_daddr[2] = bpf_htonl(0xffff);
		p->inner_daddr[3] = ip->daddr;
		p->inner_proto = ip->protocol;
		if (hlen > 60)
			return;
		l4 = q + hlen;
	} else {
		struct ipv6hdr *ip6 = (struct ipv6hdr *)q;

		if ((void *)(ip6 + 1) > end || ip6->version != 6 || qlen < sizeof(*ip6) + 8)
			return;
		__builtin_memcpy(p->inner_saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->inner_daddr, &ip6->daddr, 16);
		p->inner_proto = ip6->nexthdr;
		l4 = q + sizeof(*ip6);
	}
	if ((void *)(l4 + 8) > end)
		return;
	switch (p->inner_proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		p->inner_sport = ((__u16)l4[0] << 8) | l4[1];
		p->inner_dport = ((__u16)l4[2] << 8) | l4[3];
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6_:
		if (is_echo(p->family, p->inner_proto, l4[0]))
			p->inner_sport = p->inner_dport = ((__u16)l4[4] << 8) | l4[5];
		break;
	default:
		return; /* IPv6 extension headers and the rest: not followed */
	}
	p->related = 1;
}

/* parse_l4 reads ports and flags from the L4 header at l4, of which the
 * IP header says l4len bytes exist. A header the packet cannot hold is
 * malformed: passing it would let a tiny first fragment hide its ports. */
static __always_inline int parse_l4(struct pkt *p, __u8 *l4, void *end, __u32 l4len, __u8 hop_limit)
{
	switch (p->proto) {
	case IPPROTO_TCP:
		if (l4len < 20 || (void *)(l4 + 20) > end)
			return PARSE_MALFORMED;
		if ((l4[12] >> 4) < 5 || (__u32)(l4[12] >> 4) * 4 > l4len)
			return PARSE_MALFORMED;
		p->tcp_flags = l4[13];
		break;
	case IPPROTO_UDP:
		if (l4len < 8 || (void *)(l4 + 8) > end)
			return PARSE_MALFORMED;
		break;
	case IPPROTO_SCTP:
		if (l4len < 12 || (void *)(l4 + 12) > end)
			return PARSE_MALFORMED;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6_:
		if (l4len < 8 || (void *)(l4 + 8) > end)
			return PARSE_MALFORMED;
		/* Echo request and reply share the identifier: using it as both
		 * ports makes a reply the exact reverse of its request. */
		if (is_echo(p->family, p->proto, l4[0])) {
			p->sport = ((__u16)l4[4] << 8) | l4[5];
			p->dport = p->sport;
			p->echo_reply = l4[0] == 0 || l4[0] == 129;
		}
		/* Errors (destination unreachable, packet too big, time
		 * exceeded, parameter problem) quote the packet they are about. */
		if ((p->family == 4 && p->proto == IPPROTO_ICMP && (l4[0] == 3 || l4[0] == 11 || l4[0] == 12)) ||
		    (p->family == 6 && p->proto == IPPROTO_ICMPV6_ && l4[0] >= 1 && l4[0] <= 4))
			parse_quoted(p, l4 + 8, end, l4len - 8);
		/* IPv6's link-local control passes like ARP (once the sender
		 * passed the spoof check): neighbour discovery with the hop
		 * limit 255 RFC 4861 requires, and multicast listener queries
		 * and reports (MLD, RFC 2710/3810) with hop limit 1. The proof
		 * is the destination, which no router forwards: a hop limit is
		 * the sender's to choose, and a pod's "neighbour solicitation"
		 * to a routed address carried a payload past every policy. */
		if (p->family == 6 && p->proto == IPPROTO_ICMPV6_ && link_scoped(p->daddr) &&
		    ((l4[0] >= 133 && l4[0] <= 137 && hop_limit == 255) ||
		     (((l4[0] >= 130 && l4[0] <= 132) || l4[0] == 143) && hop_limit == 1)))
			return PARSE_ND;
		return PARSE_OK;
	default:
		return PARSE_OK;
	}
	p->sport = ((__u16)l4[0] << 8) | l4[1];
	p->dport = ((__u16)l4[2] << 8) | l4[3];
	return PARSE_OK;
}

/* frag_first remembers the ports of a first fragment for the ones that
 * follow; frag_later finds them. Only a first fragment that passed is
 * remembered: the table is the node's, and a pod whose packets are
 * dropped must not be able to churn it. */
static __always_inline void frag_first(struct pkt *p)
{
	struct frag_key k = { .id = p->frag_id, .proto = p->proto };
	struct frag_value v = { .sport = p->sport, .dport = p->dport };

	__builtin_memcpy(k.saddr, p->xlated == 2 ? p->orig_addr : p->saddr, 16);
	__builtin_memcpy(k.daddr, p->xlated == 1 ? p->orig_addr : p->daddr, 16);
	if (p->xlated == 1)
		v.dport = p->orig_port;
	else if (p->xlated == 2)
		v.sport = p->orig_port;
	if (bpf_map_update_elem(&fragments, &k, &v, BPF_ANY))
		stat_inc(STAT_FRAG_INSERT_FAIL);
}

static __always_inline int frag_later(struct pkt *p, __u32 id)
{
	struct frag_key k = { .id = id, .proto = p->proto };
	struct frag_value *v;

	__builtin_memcpy(k.saddr, p->saddr, 16);
	__builtin_memcpy(k.daddr, p->daddr, 16);
	v = bpf_map_lookup_elem(&fragments, &k);
	if (!v)
		return PARSE_FRAG_UNKNOWN;
	p->sport = v->sport;
	p->dport = v->dport;
	return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p, void *data, void *end)
{
	struct iphdr *ip = data + ETH_HLEN;
	__u32 hlen, tot, frag;
	int ret;

	if ((void *)(ip + 1) > end)
		return PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_MALFORMED;
	hlen = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || tot + ETH_HLEN > skb->len)
		return PARSE_MALFORMED;
	p->family = 4;
	p->proto = ip->protocol;
	p->ttl = ip->ttl;
	p->saddr[2] = bpf_htonl(0xffff);
	p->saddr[3] = ip->saddr;
	p->daddr[2] = bpf_htonl(0xffff);
	p->daddr[3] = ip->daddr;

	frag = bpf_ntohs(ip->frag_off);
	p->l4_off = ETH_HLEN + hlen;
	if (frag & 0x1fff) {
		p->frag_later = 1;
		return frag_later(p, bpf_ntohs(ip->id));
	}
	ret = parse_l4(p, (__u8 *)ip + hlen, end, tot - hlen, 0);
	p->frag_first = ret == PARSE_OK && (frag & 0x2000);
	p->frag_id = bpf_ntohs(ip->id);
	return ret;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p, void *data, void *end)
{
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u32 payload, off = sizeof(*ip6), is_frag = 0, frag_id = 0;
	__u8 nexthdr, *hdr;
	int ret;

	if ((void *)(ip6 + 1) > end)
		return PARSE_MALFORMED;
	if (ip6->version != 6)
		return PARSE_MALFORMED;
	payload = bpf_ntohs(ip6->payload_len);
	if (payload == 0 || payload + sizeof(*ip6) + ETH_HLEN > skb->len)
		return PARSE_MALFORMED;
	p->family = 6;
	p->ttl = ip6->hop_limit;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;

	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		__u32 len;

		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING && nexthdr != IPPROTO_DSTOPTS &&
		    nexthdr != IPPROTO_FRAGMENT && nexthdr != IPPROTO_AH)
			break;
		if (off > 40 + MAX_IPV6_EXT * 2048)
			return PARSE_MALFORMED;
		hdr = (__u8 *)ip6 + off;
		if ((void *)(hdr + 8) > end || off + 8 > payload + sizeof(*ip6))
			return PARSE_MALFORMED;
		if (nexthdr == IPPROTO_FRAGMENT) {
			__u16 fo = ((__u16)hdr[2] << 8) | hdr[3];

			if (is_frag)
				return PARSE_MALFORMED;
			is_frag = 1 | (fo & 1) << 1; /* bit 1: more fragments */
			frag_id = ((__u32)hdr[4] << 24) | ((__u32)hdr[5] << 16) | ((__u32)hdr[6] << 8) | hdr[7];
			nexthdr = hdr[0];
			off += 8;
			if (fo >> 3) {
				p->proto = nexthdr;
				p->frag_later = 1;
				return frag_later(p, frag_id);
			}
			continue;
		}
		len = nexthdr == IPPROTO_AH ? ((__u32)hdr[1] + 2) * 4 : ((__u32)hdr[1] + 1) * 8;
		nexthdr = hdr[0];
		off += len;
	}
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS ||
	    nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_AH)
		return PARSE_MALFORMED; /* more extension headers than we read */
	if (off > payload + sizeof(*ip6) || off > 40 + MAX_IPV6_EXT * 2048)
		return PARSE_MALFORMED;
	p->proto = nexthdr;
	p->l4_off = ETH_HLEN + off;
	ret = parse_l4(p, (__u8 *)ip6 + off, end, payload + sizeof(*ip6) - off, ip6->hop_limit);
	p->frag_first = ret == PARSE_OK && (is_frag & 2);
	p->frag_id = frag_id;
	return ret;
}

static __always_inline int parse_headers(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u16 proto;

	if (data + ETH_HLEN > end)
		return PARSE_MALFORMED;
	proto = ((struct ethhdr *)data)->h_proto;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, p, data, end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, p, data, end);
	return PARSE_NONIP;
}

/* parse reads the headers in place. Only when they run past the linear part
 * into paged data does it pull and read again: a pull copies (and unclones)
 * the head of every TCP segment a pod sends, which costs more than the whole
 * decision and keeps the receiver from coalescing segments. A malformed
 * result has no side effects, so reading twice is safe. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	int ret = parse_headers(skb, p);

	if (ret == PARSE_MALFORMED && skb->data_end - skb->data < skb->len) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		__builtin_memset(p, 0, sizeof(*p));
		ret = parse_headers(skb, p);
	}
	return ret;
}

static __always_inline __u32 ipcache_identity(const __u32 *addr)
{
	struct ipcache_key k = { .prefixlen = 128 };
	struct ipcache_value *v;

	__builtin_memcpy(k.addr, addr, 16);
	v = bpf_map_lookup_elem(&ipcache, &k);
	return v ? v->identity : ID_WORLD;
}

/* peer_identity is the other end of a packet at a hook: its destination
 * leaving a pod, its source entering one, the node itself when the node's
 * own stack sent it. */
static __always_inline __u32 peer_identity(struct pkt *p, __u8 scope, int from_host)
{
	if (scope == SCOPE_EGRESS)
		return ipcache_identity(p->daddr);
	return from_host ? ID_HOST : ipcache_identity(p->saddr);
}

/* subject_flags returns the identity flags of the endpoint's identity.
 * The endpoint keeps a copy stamped with the policy revision it was read
 * under; every change to the identities map bumps the revision after it,
 * so a matching stamp is current and a new flow skips the lookup. The
 * revision is read before the map, so a copy read during a change is
 * stamped old and read again. The copy also carries the identity it is
 * for: a hash map may hand an element this program still writes to
 * another key, and a copy of another identity's flags must not count. So
 * the cache holds revision (bits 32-63), identity (8-31) and flags (0-7),
 * and serves identities below 2^24 (every pod's; CIDR identities are
 * never endpoints). */
static __always_inline __u32 subject_flags(struct endpoint *ep, __u32 subject, __u32 rev)
{
	__u64 cache = ep->id_flags_cache;
	__u32 flags, *f;

	if (rev && subject < (1 << 24) && cache == ((__u64)rev << 32 | (__u64)subject << 8 | (cache & 0xff)))
		return cache & 0xff;
	f = bpf_map_lookup_elem(&identities, &subject);
	if (f) {
		flags = *f;
	} else {
		flags = IDF_RULES_INGRESS | IDF_RULES_EGRESS | IDF_ANYPEER_INGRESS | IDF_ANYPEER_EGRESS |
			IDF_ANYPROTO_INGRESS | IDF_ANYPROTO_EGRESS;
		if ((subject >= ID_MIN_MANUAL && subject <= ID_MAX_MANUAL) || subject == ID_UNRESOLVED)
			flags |= IDF_ISO_INGRESS | IDF_ISO_EGRESS;
	}
	if (subject < (1 << 24) && flags < (1 << 8))
		ep->id_flags_cache = (__u64)rev << 32 | (__u64)subject << 8 | flags;
	return flags;
}

/* decide checks one side of a packet against the policy map, for a
 * subject with rules in that direction (judge() answers the others).
 * flags are the subject identity's (subject_flags). meta packs direction
 * (bits 0-1), deny-only (bit 2), protocol (8-15) and destination port
 * (16-31) to stay within the five arguments of a BPF call. It returns a
 * reason: ALLOW_RULE, ALLOW_OPEN, DROP_DENY or DROP_NO_RULE. */
__noinline int decide(__u32 subject, __u32 peer, __u32 meta, __u32 flags)
{
	__u8 dir = meta & 3, deny_only = meta & 4, proto = (meta >> 8) & 0xff;
	__u16 dport = meta >> 16;
	struct policy_key k = { .subject = subject, .dir = dir };
	int allow = 0, deny = 0, iso, ports = has_ports(proto), any_peer, any_proto;

	iso = dir == DIR_INGRESS ? flags & IDF_ISO_INGRESS : flags & IDF_ISO_EGRESS;
	any_peer = flags & (dir == DIR_INGRESS ? IDF_ANYPEER_INGRESS : IDF_ANYPEER_EGRESS);
	any_proto = flags & (dir == DIR_INGRESS ? IDF_ANYPROTO_INGRESS : IDF_ANYPROTO_EGRESS);
	for (int i = 0; i < 4; i++) {
		struct policy_value *v;

		/* Wildcard entries are looked up only where they exist. */
		if ((i >= 2 && !any_peer) || ((i & 1) && !any_proto))
			continue;
		k.peer = i < 2 ? peer : ID_ANY;
		k.proto = (i & 1) ? 0 : proto;
		v = bpf_map_lookup_elem(&policy, &k);
		if (!v)
			continue;
		allow |= v->allow_all;
		deny |= v->deny_all;
		if (!ports)
			continue;
		for (int j = 0; j < POLICY_MAX_ALLOW; j++) {
			if (j >= v->n_allow)
				break;
			if (dport >= v->allow[j].lo && dport <= v->allow[j].hi)
				allow = 1;
		}
		for (int j = 0; j < POLICY_MAX_DENY; j++) {
			if (j >= v->n_deny)
				break;
			if (dport >= v->deny[j].lo && dport <= v->deny[j].hi)
				deny = 1;
		}
	}
	if (deny)
		return REASON_DROP_DENY;
	if (deny_only || !iso)
		return REASON_ALLOW_OPEN;
	return allow ? REASON_ALLOW_RULE : REASON_DROP_NO_RULE;
}

static __always_inline int is_drop(int reason)
{
	return reason >= REASON_DROP_NO_RULE;
}

static __always_inline void trace(struct pkt *p, __u32 src, __u32 dst, int reason)
{
	bpf_printk("TC: HIT from %x (id=%u) to %x (id=%u)", bpf_ntohl(p->saddr[3]), src,
		   bpf_ntohl(p->daddr[3]), dst);
	switch (reason) {
	case REASON_DROP_NO_RULE:
		bpf_printk("TC: DENY id %u -> id %u (no rule)", src, dst);
		break;
	case REASON_DROP_DENY:
		bpf_printk("TC: DENY id %u -> id %u (deny rule)", src, dst);
		break;
	case REASON_DROP_SPOOF:
		bpf_printk("TC: DENY id %u -> id %u (spoofed source)", src, dst);
		break;
	case REASON_DROP_REVOKED:
		bpf_printk("TC: DENY id %u -> id %u (revoked)", src, dst);
		break;
	case REASON_DROP_MALFORMED:
	case REASON_DROP_NO_ENDPOINT:
	case REASON_DROP_FRAG:
		bpf_printk("TC: DENY id %u -> id %u (reason %d)", src, dst, reason);
		break;
	default:
		bpf_printk("TC: ALLOW id %u -> id %u", src, dst);
	}
}

/* An endpoint as one hook sees it: its host veth, its entry, the slot
 * of its conntrack tables and state, and which of its hooks this is.
 * Tables and state are looked up where they are used: an established
 * packet needs one table, not both. */
struct hook_ep {
	__u32 ifindex;
	__u32 slot;
	/* NULL: no endpoint behind this veth, or not looked up yet (see
	 * hook_local) */
	struct endpoint *ep;
	__u8 scope;
	__u8 from_host; /* the node's own stack sent the packet */
	__u8 from_net;  /* from_net took it in: it comes from another node's pod */
};

/* A new Service flow's backend: the frontend's id, the backend's slot,
 * and whether the frontend has session affinity. */
struct svc_pick {
	__u32 id;
	__u32 slot;
	__u32 affinity;
};

/* One packet as every step of its decision reads it. */
struct pctx {
	struct __sk_buff *skb;
	struct pkt *p;
	struct config *cfg; /* NULL when the loader wrote none */
	__u32 rev;          /* the policy revision the packet is decided under */
	__u64 now;          /* conntrack's clock */
	/* A new Service flow's backend pick, to remember once the flow is
	 * admitted (only one check of a packet translates) */
	struct svc_pick pick;
	__u8 svc_new; /* this packet was translated by a new pick */
	__u8 hairpin; /* the check is a pod's ingress for its own flow to itself */
	/* the pod's tuple's entry, even a dead one (see flow.old) */
	struct ct_value *orig_old;
};

/* hook_open names h's slot: its endpoint's, or the shared slot 0 when it
 * has none (or one out of range). */
static __always_inline void hook_open(struct hook_ep *h)
{
	h->slot = h->ep && h->ep->ct_slot < MAX_ENDPOINTS ? h->ep->ct_slot : 0;
}

/* hook_endpoint is h's endpoint, looked up the first time a step needs
 * it when hook_local opened h without it. NULL: there is none. */
static __always_inline struct endpoint *hook_endpoint(struct hook_ep *h)
{
	__u32 ifindex = h->ifindex;

	if (!h->ep)
		h->ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	return h->ep;
}

/* hook_local opens the ingress hook of the local pod lp for a packet
 * handed to it past its own to_pod (from_net, from_pod's delivery). Its
 * entry names the pod's conntrack slot, so a known flow's packet under
 * the current policy, which needs nothing else of the endpoint, costs no
 * endpoint lookup: the first step that needs the endpoint looks it up
 * (hook_endpoint). An entry that names no slot (pin layout 3's) leaves
 * it to the endpoint. Returns 0 when that finds none. */
static __always_inline int hook_local(struct hook_ep *h, struct local_pod *lp)
{
	h->ifindex = lp->ifindex;
	if (lp->ct_slot && lp->ct_slot < MAX_ENDPOINTS) {
		h->slot = lp->ct_slot;
		return 1;
	}
	if (!hook_endpoint(h))
		return 0;
	hook_open(h);
	return 1;
}

/* ct_table is h's conntrack table for keys of scope kscope, or the shared
 * one when the plugin's DEL or GC freed the slot while the endpoint entry
 * still names it (its packets are the last ones). NULL only when the
 * loader's shared table is missing. */
static __always_inline void *ct_table(struct hook_ep *h, const __u8 kscope)
{
	__u32 idx = h->slot * 2 + kscope;
	void *t = bpf_map_lookup_elem(&ct_tables, &idx);

	if (!t) {
		idx = kscope;
		t = bpf_map_lookup_elem(&ct_tables, &idx);
	}
	return t;
}

/* The hook_eps never have their address taken, a helper's key included:
 * the compiler then keeps them in registers and folds their scope, and
 * the verifier meets one path per hook, not one per possible scope. */
static __always_inline struct ep_state *ep_state(struct hook_ep *h)
{
	__u32 slot = h->slot;

	return bpf_map_lookup_elem(&ep_states, &slot);
}

static __always_inline void event_loss_inc(int reason, int held_back)
{
	__u32 idx = (__u32)reason * 2 + held_back;
	__u64 *v = bpf_map_lookup_elem(&event_loss, &idx);

	if (v)
		*v += 1;
}

/* events_admit spends one of the endpoint's events for this window. It
 * returns how many events the limit held back since the endpoint's last
 * one, or -1 when it holds back this one too. CPUs racing on a window
 * may let a few more through or lose a few counts: the limit is against
 * floods, and the counts are reports, not verdicts. */
static __always_inline long events_admit(struct ep_state *st)
{
	__u64 now;
	__u32 held;

	if (!st)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	if (now - st->ev_window >= EVENTS_WINDOW) {
		st->ev_window = now;
		st->ev_sent = 0;
	}
	if (st->ev_sent >= EVENTS_PER_WINDOW) {
		__sync_fetch_and_add(&st->ev_suppressed, 1);
		return -1;
	}
	st->ev_sent++;
	held = st->ev_suppressed;
	if (held)
		__sync_fetch_and_add(&st->ev_suppressed, -held);
	return held;
}

static __always_inline void emit(struct pctx *c, struct hook_ep *h, __u32 src, __u32 dst, int reason)
{
	struct pkt *p = c->p;
	struct ep_state *st = ep_state(h);
	long held = events_admit(st);
	struct event *e;
	__u64 avail;

	if (held < 0) {
		event_loss_inc(reason, 1);
		return;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_EVENT_LOST);
		event_loss_inc(reason, 0);
		if (held && st) /* still to be told */
			__sync_fetch_and_add(&st->ev_suppressed, held);
		return;
	}
	e->ts = bpf_ktime_get_ns();
	e->ifindex = h->ifindex;
	e->src_identity = src;
	e->dst_identity = dst;
	e->len = c->skb->len;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->family = p->family;
	e->verdict = is_drop(reason) ? VERDICT_DROP : VERDICT_ALLOW;
	e->reason = reason;
	e->scope = h->scope;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	e->suppressed = held;
	/* Waking the reader for every event costs more than deciding the
	 * packet. Wake it when the waiting data crosses a batch size, once,
	 * and let it poll for the rest (bpf.EventReader does, every 100 ms). */
	avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, avail >= EVENTS_WAKEUP_BYTES && avail < EVENTS_WAKEUP_BYTES + 2 * sizeof(*e) + 16
				      ? BPF_RB_FORCE_WAKEUP
				      : BPF_RB_NO_WAKEUP);
}

/* debugging reports whether the loader asked for seed-style trace lines. */
static __always_inline int debugging(const struct pctx *c)
{
	return c->cfg && c->cfg->debug;
}

/* report counts, traces and reports the verdict of one hook of h and
 * returns its reason. Events go out for every drop and for the first
 * packet of every flow, within the endpoint's event budget. The subject
 * is h's endpoint's identity (0 without one), asked only when something
 * shows it. */
static __always_inline int report(struct pctx *c, struct hook_ep *h, __u32 peer, int reason, int event)
{
	int debug = debugging(c);
	struct endpoint *ep;
	__u32 subject, src, dst;

	count(reason, h->scope, c->skb->len);
	if (!debug && !event && !is_drop(reason))
		return reason;
	ep = hook_endpoint(h);
	subject = ep ? ep->identity : 0;
	src = h->scope == SCOPE_EGRESS ? subject : peer;
	dst = h->scope == SCOPE_EGRESS ? peer : subject;
	if (debug)
		trace(c->p, src, dst, reason);
	if (event || is_drop(reason))
		emit(c, h, src, dst, reason);
	return reason;
}

/* ct_touch brings a flow's entry up to date with one of its packets: the
 * flags it sets and the deadline they give. It reports whether it wrote
 * the entry; a deadline moves only once it is CT_REFRESH_SLACK stale, so
 * most packets of a busy flow write nothing. */
static __always_inline int ct_touch(struct ct_value *ct, struct pkt *p, __u64 now, int reply)
{
	__u32 flags = ct->flags;
	__u64 timeout = CT_TIMEOUT_OTHER, expires;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (p->proto == IPPROTO_TCP) {
		if (p->tcp_flags & TCP_FIN)
			flags |= reply ? CT_F_SEEN_FIN_REV : CT_F_SEEN_FIN_FWD;
		if ((p->tcp_flags & TCP_RST) ||
		    (flags & (CT_F_SEEN_FIN_FWD | CT_F_SEEN_FIN_REV)) == (CT_F_SEEN_FIN_FWD | CT_F_SEEN_FIN_REV))
			flags |= CT_F_CLOSING;
		if (flags & CT_F_CLOSING)
			timeout = CT_TIMEOUT_CLOSE;
		else if (flags & CT_F_SEEN_REPLY)
			timeout = CT_TIMEOUT_TCP;
		else
			timeout = CT_TIMEOUT_SYN;
	}
	expires = now + timeout;
	if (flags != ct->flags) {
		ct->flags = flags;
		ct->expires = expires;
		return 1;
	}
	if (expires > ct->expires + CT_REFRESH_SLACK) {
		ct->expires = expires;
		return 1;
	}
	return 0;
}

/* ct_key_set fills k with a flow's tuple as conntrack keys it: from saddr
 * port sport to daddr port dport, seen at the hook scope. */
static __always_inline void ct_key_set(struct ct_key *k, const __u32 *saddr, const __u32 *daddr, __u16 sport,
				       __u16 dport, __u8 proto, __u8 scope)
{
	__builtin_memcpy(k->saddr, saddr, 16);
	__builtin_memcpy(k->daddr, daddr, 16);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->scope = scope;
}

/* ct_added and ct_removed keep the endpoint's count of the entries of its
 * table for keys of scope kscope. A flow added to a full table pushed
 * out the least recently used one: an eviction, of the endpoint's own
 * flows of that table only. */
static __always_inline void ct_added(struct ep_state *st, __u8 kscope)
{
	struct ct_usage *u;

	if (!st)
		return;
	u = &st->ct[kscope & 1]; /* the mask is for the verifier: a scope is 0 or 1 */
	__sync_fetch_and_add(&u->created, 1);
	if (u->count >= st->ct_capacity)
		__sync_fetch_and_add(&u->evicted, 1);
	else
		__sync_fetch_and_add(&u->count, 1);
}

static __always_inline void ct_removed(struct ep_state *st, __u8 kscope)
{
	kscope &= 1;
	if (st && st->ct[kscope].count)
		__sync_fetch_and_add(&st->ct[kscope].count, -1);
}

/* mid_flow reports whether a packet can only belong to a flow already
 * under way: any TCP segment but a bare SYN, an ICMP echo reply. When
 * conntrack knows no such flow (its table evicted it, it expired, the
 * node never saw it), a drop says so under its own reason, apart from
 * drops of new flows by policy. */
static __always_inline int mid_flow(struct pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return (p->tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN;
	return p->echo_reply;
}

/* CHECK_STACK is check()'s answer when a packet would start a flow at a
 * hook that from_pod runs on a local pod's behalf: see handle(). */
#define CHECK_STACK -1

/* What conntrack knows of a packet at one hook. */
enum ct_status {
	CT_NEW,         /* no live flow: policy decides it as a new one */
	CT_ESTABLISHED, /* a packet of a flow this hook admitted */
	CT_REPLY,       /* the reverse of a flow the endpoint's other hook admitted */
	CT_RELATED,     /* an ICMP error quoting a flow of either hook */
	CT_NO_TABLE,    /* the loader's shared table is missing: nothing can be tracked */
	CT_NO_BACKEND,  /* a new flow to a Service frontend with no backend: rejected */
	CT_BROKEN,      /* the packet could not be rewritten */
};

/* A packet's flow at one hook, as check()'s steps pass it on. */
struct flow {
	struct ct_key key;   /* the entry's key: found, or to insert for a new flow */
	struct ct_value *ct; /* the live entry; NULL for a new flow */
	void *table;         /* the table key is (or goes) in */
	__u8 kscope;         /* the scope of that table's keys */
	__u8 deny_only;      /* 4 when the flow is the node's (CT_F_HOST): only deny rules hold */
	__u8 touched;        /* translate() already brought ct up to date with this packet */
	__u32 peer;          /* the other end's identity; ID_ANY until peer() asks */
	__u32 flags;         /* the flow's conntrack flags after this packet */
	struct local_pod *lp; /* for a new flow leaving a pod: the local pod it goes to */
	/* The forward key's entry, even a dead one (expired, or closing and
	 * reopened by a SYN): a new flow of the tuple is written over it
	 * (ct_put). */
	struct ct_value *old;
};

/* ct_find looks f->key up in h's table of kscope and keeps the entry in f
 * when it is live. */
static __always_inline int ct_find(struct pctx *c, struct hook_ep *h, struct flow *f, const __u8 kscope)
{
	void *t = ct_table(h, kscope);
	struct ct_value *ct = t ? bpf_map_lookup_elem(t, &f->key) : NULL;

	if (!ct || ct->expires <= c->now)
		return 0;
	f->ct = ct;
	f->table = t;
	f->kscope = kscope;
	f->deny_only = ct->flags & CT_F_HOST ? 4 : 0;
	if (f->deny_only)
		f->peer = ID_HOST;
	if (ct->flags & CT_F_HAIRPIN)
		f->peer = ct->peer;
	return 1;
}

static __always_inline int bare_syn(struct pkt *p)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* ct_lookup classifies a packet at h's hook. An ICMP error about a flow
 * this endpoint's hooks admitted is related to it (path MTU discovery, a
 * closed port) while the flow is current: the quoted packet went the
 * other hook's way as a packet of the flow, or this hook's way as its
 * reply. Anything else is an ICMP packet like any other. A bare SYN
 * opens a connection and is never a reply, which spares new TCP flows
 * the reverse lookup; it reopens a closing flow's tuple. */
static __always_inline enum ct_status ct_lookup(struct pctx *c, struct hook_ep *h, struct flow *f)
{
	struct pkt *p = c->p;
	const __u8 scope = h->scope;
	struct ct_value *ct;

	if (p->related) {
		ct_key_set(&f->key, p->inner_saddr, p->inner_daddr, p->inner_sport, p->inner_dport, p->inner_proto,
			   scope ^ 1);
		if (!ct_find(c, h, f, scope ^ 1)) {
			ct_key_set(&f->key, p->inner_daddr, p->inner_saddr, p->inner_dport, p->inner_sport,
				   p->inner_proto, scope);
			ct_find(c, h, f, scope);
		}
		if (f->ct && (f->ct->rev == c->rev || f->deny_only))
			return CT_RELATED;
		f->ct = NULL;
		f->deny_only = 0;
		f->peer = ID_ANY;
	}

	f->table = ct_table(h, scope);
	f->kscope = scope;
	if (!f->table)
		return CT_NO_TABLE;
	ct_key_set(&f->key, p->saddr, p->daddr, p->sport, p->dport, p->proto, scope);
	ct = bpf_map_lookup_elem(f->table, &f->key);
	f->old = ct;
	if (ct && ct->expires > c->now && !((ct->flags & CT_F_CLOSING) && bare_syn(p))) {
		f->ct = ct;
		f->deny_only = ct->flags & CT_F_HOST ? 4 : 0;
		if (f->deny_only)
			f->peer = ID_HOST;
		if (ct->flags & CT_F_HAIRPIN)
			f->peer = ct->peer;
		return CT_ESTABLISHED;
	}
	if (bare_syn(p))
		return CT_NEW;

	ct_key_set(&f->key, p->daddr, p->saddr, p->dport, p->sport, p->proto, scope ^ 1);
	if (ct_find(c, h, f, scope ^ 1))
		return CT_REPLY;
	/* A new flow keys the forward tuple (f->table is still the forward
	 * table: a miss leaves it). */
	ct_key_set(&f->key, p->saddr, p->daddr, p->sport, p->dport, p->proto, scope);
	return CT_NEW;
}

/* peer is the identity at the flow's other end, looked up once and only
 * when a step needs it: an established packet under the current policy
 * needs none. */
static __always_inline __u32 peer(struct pctx *c, struct hook_ep *h, struct flow *f)
{
	if (f->peer == ID_ANY)
		f->peer = peer_identity(c->p, h->scope, h->from_host);
	return f->peer;
}

/* judge decides the packet of f at h by policy, meta as decide() takes
 * it. A subject with no rules in meta's direction is decided by its
 * isolation alone, without the peer: its identity is looked up (an
 * ipcache lookup) only when rules are to be matched. Most subjects have
 * rules one way only, so the first reply of a flow, whose deny check is
 * the other way, mostly asks nothing. A hook whose endpoint is gone
 * drops the packet as no-endpoint, whatever meta asks. */
static __always_inline int judge(struct pctx *c, struct hook_ep *h, struct flow *f, __u32 meta)
{
	struct endpoint *ep = hook_endpoint(h);
	const int in = (meta & 3) == DIR_INGRESS;
	__u32 subject, flags;

	if (!ep)
		return REASON_DROP_NO_ENDPOINT;
	subject = ep->identity;
	flags = subject_flags(ep, subject, c->rev);

	if (!(flags & (in ? IDF_RULES_INGRESS : IDF_RULES_EGRESS)))
		return (flags & (in ? IDF_ISO_INGRESS : IDF_ISO_EGRESS)) && !(meta & 4) ? REASON_DROP_NO_RULE
											 : REASON_ALLOW_OPEN;
	return decide(subject, peer(c, h, f), meta, flags);
}

/* rewrite replaces a packet's destination (dst) or source address and
 * port, in the packet and in p, keeping the IP header checksum and the
 * TCP or UDP checksum, whose pseudo-header holds the addresses, right.
 * A fragment after the first has no L4 header: its addresses change,
 * the first one's checksum covers them. SCTP's CRC32c covers no address,
 * but it does cover the port: a pod's SCTP leaves its veth with the CRC
 * still to be computed (veth offloads it), and a packet that carries
 * one keeps the old port's. */
__noinline int rewrite(struct __sk_buff *skb, struct pkt *p, __u32 dst, const struct addr16 *a, __u32 port)
{
	__u32 *old, csum_off = 0, mangled0 = 0, l3;
	__u16 *oport, op, np = bpf_htons(port);
	const __u32 *addr;
	__s64 diff;

	if (!skb || !p || !a)
		return -1;
	addr = a->w;
	old = dst ? p->daddr : p->saddr;
	oport = dst ? &p->dport : &p->sport;
	op = bpf_htons(*oport);

	if (!p->frag_later && p->proto == IPPROTO_TCP)
		csum_off = p->l4_off + 16;
	if (!p->frag_later && p->proto == IPPROTO_UDP) {
		csum_off = p->l4_off + 6;
		mangled0 = BPF_F_MARK_MANGLED_0; /* IPv4 UDP without a checksum stays so */
	}
	if (!p->xlated) {
		__builtin_memcpy(p->orig_addr, old, 16);
		p->orig_port = *oport;
		p->xlated = dst ? 1 : 2;
	}
	if (p->family == 4) {
		__u32 from = old[3], to = addr[3];

		l3 = ETH_HLEN + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
		if (bpf_skb_store_bytes(skb, l3, &to, 4, 0) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), from, to, 4) ||
		    (csum_off && bpf_l4_csum_replace(skb, csum_off, from, to, BPF_F_PSEUDO_HDR | mangled0 | 4)))
			return -1;
	} else {
		l3 = ETH_HLEN + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		diff = bpf_csum_diff(old, 16, (void *)addr, 16, 0);
		if (bpf_skb_store_bytes(skb, l3, (void *)addr, 16, 0) ||
		    (csum_off && bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled0)))
			return -1;
	}
	__builtin_memcpy(old, addr, 16);
	/* A later fragment's port is the flow's, not in the packet. */
	if (p->frag_later) {
		*oport = port;
		return 0;
	}
	if (csum_off && bpf_l4_csum_replace(skb, csum_off, op, np, mangled0 | 2))
		return -1;
	if (bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &np, 2, 0))
		return -1;
	*oport = port;
	return 0;
}

/* affinity_slot is the slot of the backend the client's last flow to the
 * frontend sv went to while the frontend's affinity holds and that
 * backend is still in its slot, or -1. */
static __always_inline int affinity_slot(struct pkt *p, __u64 now, struct svc_value *sv)
{
	struct affinity_key ak = { .id = sv->id };
	struct backend_key bk = { .id = sv->id };
	struct affinity_value *av;
	struct backend *b;

	__builtin_memcpy(ak.client, p->saddr, 16);
	av = bpf_map_lookup_elem(&affinity, &ak);
	if (!av || now - av->last_used > (__u64)sv->affinity_timeout * NSEC || av->slot >= sv->count)
		return -1;
	bk.slot = av->slot;
	b = bpf_map_lookup_elem(&backends, &bk);
	if (!b || b->port != av->port || __builtin_memcmp(b->addr, av->addr, 16))
		return -1;
	return bk.slot;
}

/* svc_new picks the backend of a new flow's packet to a frontend, if it
 * is one: the client's affinity's (see affinity_slot), else one at
 * random. A reader may meet a count that shrank under it (see
 * bpf.PutService): a slot gone is slot 0's backend. It returns 1 when it
 * picked one (p->pick_addr, p->pick_port; the frontend and slot in
 * pick), 0 when the destination is no frontend, -1 when the frontend has
 * no backend. A global function, verified once: the verifier would
 * otherwise walk it on every path through check(). */
__noinline int svc_new(struct __sk_buff *skb, struct pkt *p, __u64 now, struct svc_pick *pick)
{
	struct svc_key k = {};
	struct backend_key bk = {};
	struct svc_value *sv;
	struct backend *b;
	int slot = -1;

	if (!skb || !p || !pick)
		return 0;
	__builtin_memcpy(k.addr, p->daddr, 16);
	k.port = p->dport;
	k.proto = p->proto;
	sv = bpf_map_lookup_elem(&services, &k);
	if (!sv)
		return 0;
	if (!sv->count)
		return -1;
	pick->id = bk.id = sv->id;
	pick->affinity = sv->affinity_timeout != 0;
	if (pick->affinity)
		slot = affinity_slot(p, now, sv);
	bk.slot = slot >= 0 ? (__u32)slot : bpf_get_prandom_u32() % sv->count;
	b = bpf_map_lookup_elem(&backends, &bk);
	if (!b) {
		bk.slot = 0;
		b = bpf_map_lookup_elem(&backends, &bk);
		if (!b)
			return -1;
	}
	pick->slot = bk.slot;
	__builtin_memcpy(&p->pick_addr, b->addr, 16);
	p->pick_port = b->port;
	return 1;
}

/* ct_retrack looks the translated tuple of a pod's packet up in the
 * table its own tuple was looked up in: the flow's policy memo is there.
 * A translated packet is a forward one, so there is no reply to look
 * for. */
static __always_inline enum ct_status ct_retrack(struct pctx *c, struct flow *f)
{
	struct pkt *p = c->p;
	struct ct_value *ct;

	ct_key_set(&f->key, p->saddr, p->daddr, p->sport, p->dport, p->proto, SCOPE_EGRESS);
	ct = bpf_map_lookup_elem(f->table, &f->key);
	f->old = ct;
	f->ct = NULL;
	if (ct && ct->expires > c->now && !((ct->flags & CT_F_CLOSING) && bare_syn(p))) {
		f->ct = ct;
		return CT_ESTABLISHED;
	}
	return CT_NEW;
}

/* translate is where a Service's address becomes a backend's, before
 * policy sees the packet, so policy judges the backend (DESIGN.md
 * section 3). Only a pod's own packets are translated (from_pod's own
 * check): a packet of a flow that has its backend goes to it, and keeps
 * the entry that says so alive; a new flow to a frontend gets one.
 * Conntrack is then asked again, for the translated tuple: its entry is
 * the flow's policy memo, and the one whose replies are translated back
 * (see check). A packet of an established flow skips that second lookup
 * while the pod's entry can answer for it, which it then does, policy's
 * revision stamp included: when the pod's entry did not need refreshing
 * (so the translated one is refreshed at least as often, once a second or
 * so) and the packet changes no TCP state (SYN, FIN, RST reach the
 * translated entry, whose flags end the flow). A new pick whose
 * translated tuple has a flow (the table evicted the pod's tuple's entry)
 * starts it again, as new, so that both entries exist after it. Replies
 * are not translated here: their source changes only once they are
 * allowed. */
static __always_inline enum ct_status translate(struct pctx *c, struct hook_ep *h, struct flow *f,
						enum ct_status st)
{
	struct pkt *p = c->p;

	if (h->scope != SCOPE_EGRESS)
		return st;
	if (st == CT_ESTABLISHED) {
		struct ct_value *orig = f->ct;
		int wrote;

		if (!(orig->flags & CT_F_SVC_ORIG))
			return st;
		wrote = ct_touch(orig, p, c->now, 0);
		if (rewrite(c->skb, p, 1, (struct addr16 *)orig->nat_addr, orig->nat_port))
			return CT_BROKEN;
		if (wrote || (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST))))
			return ct_retrack(c, f);
		f->touched = 1;
		return CT_ESTABLISHED;
	}
	if (st != CT_NEW || p->related || p->frag_later || !has_ports(p->proto))
		return st;
	switch (svc_new(c->skb, p, c->now, &c->pick)) {
	case 0:
		return st;
	case 1:
		break;
	default:
		return CT_NO_BACKEND;
	}
	if (rewrite(c->skb, p, 1, &p->pick_addr, p->pick_port))
		return CT_BROKEN;
	c->svc_new = 1;
	c->orig_old = f->old;
	ct_retrack(c, f);
	f->ct = NULL;
	return CT_NEW;
}

/* policy decides the packet by its status, under the current revision.
 * A flow admitted under an older one is checked again as new (a drop
 * revokes it), and keeps the answer: the entry's revision stamp and its
 * reply-deny bit are memos of policy, so each costs one decision per
 * revision. Flows the local node opened to its pod (CT_F_HOST) need no
 * rule, but deny rules hold for them like for any flow: on every policy
 * change and for their replies. */
static __always_inline int policy_check(struct pctx *c, struct hook_ep *h, struct flow *f, enum ct_status st,
					int no_new)
{
	struct pkt *p = c->p;
	const __u8 dir = h->scope == SCOPE_EGRESS ? DIR_EGRESS : DIR_INGRESS;
	const __u8 rdir = h->scope == SCOPE_EGRESS ? DIR_INGRESS : DIR_EGRESS;
	struct ct_value *ct = f->ct;
	__u32 proto = (__u32)p->proto << 8;
	int reason;

	switch (st) {
	case CT_NO_TABLE:
		return REASON_DROP_NO_ENDPOINT;
	case CT_NO_BACKEND:
		return REASON_DROP_NO_BACKEND;
	case CT_BROKEN:
		return REASON_DROP_MALFORMED;
	case CT_RELATED:
		reason = judge(c, h, f, dir | 4 | proto);
		return is_drop(reason) ? reason : REASON_ALLOW_RELATED;
	case CT_ESTABLISHED:
		if (ct->rev != c->rev) {
			reason = judge(c, h, f, dir | f->deny_only | proto | (__u32)p->dport << 16);
			if (is_drop(reason))
				return REASON_DROP_REVOKED;
			ct->rev = c->rev;
		}
		return REASON_ALLOW_ESTABLISHED;
	case CT_REPLY:
		if (ct->rev != c->rev) {
			reason = judge(c, h, f, rdir | f->deny_only | proto | (__u32)p->sport << 16);
			if (is_drop(reason))
				return REASON_DROP_REVOKED;
			ct->rev = c->rev;
		}
		if (ct->reply_rev != c->rev || ct->reply_rev == 0) {
			reason = judge(c, h, f, dir | 4 | proto | (__u32)p->dport << 16);
			if (reason == REASON_DROP_NO_ENDPOINT)
				return reason;
			if (reason == REASON_DROP_DENY)
				ct->flags |= CT_F_REPLY_DENIED;
			else
				ct->flags &= ~CT_F_REPLY_DENIED;
			ct->reply_rev = c->rev;
		}
		return ct->flags & CT_F_REPLY_DENIED ? REASON_DROP_DENY : REASON_ALLOW_REPLY;
	default:
		break;
	}
	if (no_new)
		return CHECK_STACK;
	/* The local node may always reach its pods (kubelet probes) unless a
	 * deny rule says otherwise, and the flow's replies then pass as
	 * such. Only what the node's own stack sends is the node: a
	 * forwarded packet carrying a node address is judged by policy like
	 * any other. */
	peer(c, h, f); /* a new flow's entry and event carry it */
	if (h->scope == SCOPE_INGRESS && h->from_host) {
		reason = judge(c, h, f, dir | 4 | proto | (__u32)p->dport << 16);
		return is_drop(reason) ? reason : REASON_ALLOW_HOST;
	}
	reason = judge(c, h, f, dir | proto | (__u32)p->dport << 16);
	if (reason == REASON_DROP_NO_RULE && mid_flow(p))
		reason = REASON_DROP_UNKNOWN_FLOW;
	return reason;
}

/* affinity_remember makes the backend of the client's new flow the one
 * its next ones go to while the frontend's affinity holds. Global:
 * verified once. */
__noinline int affinity_remember(struct pkt *p, __u64 now, struct svc_pick *pick)
{
	struct affinity_key ak = {};
	struct affinity_value av = {};

	if (!p || !pick)
		return 0;
	ak.id = pick->id;
	av.last_used = now;
	av.port = p->dport;
	av.slot = pick->slot;
	__builtin_memcpy(ak.client, p->saddr, 16);
	__builtin_memcpy(av.addr, p->daddr, 16);
	return bpf_map_update_elem(&affinity, &ak, &av, BPF_ANY);
}

/* ct_put writes a new flow's entry nct at key, and reports whether the
 * table holds one flow more. A tuple whose entry is still there (old: a
 * reused port's last connection, closing or expired) has nct written over
 * it in place. An update of an LRU table would take a fresh element and
 * free the old one, two trips through the table's locks (their interrupt
 * restores are hypercalls on a paravirtual guest); a client that opens
 * connections fast to one server reuses its ports within seconds, so on
 * it that is most new flows. The element is the one this packet's lookup
 * just marked as used, which the LRU evicts last; ct_touch writes through
 * the same kind of pointer, and other CPUs see the entry change as they
 * see it touched. */
static __always_inline int ct_put(void *table, struct ct_key *key, struct ct_value *old, struct ct_value *nct)
{
	if (old) {
		__builtin_memcpy(old, nct, sizeof(*nct));
		return 0;
	}
	if (bpf_map_update_elem(table, key, nct, BPF_ANY)) {
		stat_inc(STAT_CT_INSERT_FAIL);
		return 0;
	}
	return 1;
}

/* svc_remember keeps a new flow's backend, once its translated entry nct
 * is in: an entry keyed by the tuple the pod sent, which sends the
 * flow's later packets to the same backend, and the client's affinity to
 * it when the frontend has affinity. It reuses f's key and nct. */
static __always_inline void svc_remember(struct pctx *c, struct hook_ep *h, struct flow *f, struct ct_value *nct)
{
	struct pkt *p = c->p;

	ct_key_set(&f->key, p->saddr, p->orig_addr, p->sport, p->orig_port, p->proto, SCOPE_EGRESS);
	/* It never sees a reply, and lives as long as a flow that has. */
	nct->flags = (nct->flags & CT_F_ROUTED) | CT_F_SVC_ORIG | CT_F_SEEN_REPLY;
	__builtin_memcpy(nct->nat_addr, p->daddr, 16);
	nct->nat_port = p->dport;
	if (ct_put(f->table, &f->key, c->orig_old, nct))
		ct_added(ep_state(h), SCOPE_EGRESS);
	if (c->pick.affinity)
		affinity_remember(p, c->now, &c->pick);
}

/* ct_create inserts an admitted new flow. Where its packets leaving a pod
 * go, to the local pod at its far end or to routing, is asked once, here,
 * so its packets after this one skip the question when the answer is
 * routing. A pod that appears at that address later is reached through
 * routing (and to_pod) until the flow ends. A translated flow's entry
 * holds the frontend its replies come from. */
static __always_inline void ct_create(struct pctx *c, struct hook_ep *h, struct flow *f, int reason)
{
	struct ct_value nct = {};

	if (reason == REASON_ALLOW_HOST)
		nct.flags = CT_F_HOST;
	if (h->scope == SCOPE_EGRESS)
		f->lp = bpf_map_lookup_elem(&local_pods, c->p->daddr);
	if (h->scope == SCOPE_EGRESS ? !f->lp : h->from_net || !bpf_map_lookup_elem(&local_pods, c->p->saddr))
		nct.flags |= CT_F_ROUTED;
	if (c->hairpin)
		nct.flags |= CT_F_HAIRPIN;
	if (c->p->xlated == 1 && !c->hairpin) {
		nct.flags |= CT_F_SVC_REPLY;
		__builtin_memcpy(nct.nat_addr, c->p->orig_addr, 16);
		nct.nat_port = c->p->orig_port;
	}
	f->flags = nct.flags;
	nct.rev = c->rev;
	nct.subject = h->ep ? h->ep->identity : 0; /* judge() looked it up */
	nct.peer = f->peer;
	ct_touch(&nct, c->p, c->now, 0);
	if (ct_put(f->table, &f->key, f->old, &nct))
		ct_added(ep_state(h), h->scope);
	if (c->svc_new)
		svc_remember(c, h, f, &nct);
}

/* untranslate_related gives an ICMP error about a translated flow, on its
 * way to the client, the frontend wherever it names the backend: as the
 * quoted packet's destination, and as the error's own source when the
 * backend sent it (a router on the way keeps its own). The client's stack
 * then finds the socket it connected to the frontend. The quoted IPv4
 * header's checksum makes up for its new address, so the ICMP checksum
 * sees only the port; ICMPv6's covers the quoted address too, and the
 * outer source in its pseudo-header. The quoted L4 checksum stays: the
 * quote is cut short, and no stack checks it. Global: verified once. */
__noinline int untranslate_related(struct __sk_buff *skb, struct pkt *p, const struct addr16 *fe, __u32 fe_port)
{
	__u32 q, icmp_csum, ports, hl;
	__u16 op, np = bpf_htons(fe_port);
	__u8 vihl;
	__s64 diff;

	if (!skb || !p || !fe)
		return -1;
	q = p->l4_off + 8;
	icmp_csum = p->l4_off + 2;
	op = bpf_htons(p->inner_dport);
	if (p->family == 4) {
		if (bpf_skb_load_bytes(skb, q, &vihl, 1))
			return -1;
		hl = (vihl & 0xf) * 4;
		if (bpf_skb_store_bytes(skb, q + 16, &fe->w[3], 4, 0) ||
		    bpf_l3_csum_replace(skb, q + 10, p->inner_daddr[3], fe->w[3], 4))
			return -1;
		ports = q + hl;
	} else {
		diff = bpf_csum_diff(p->inner_daddr, 16, (void *)fe->w, 16, 0);
		if (bpf_skb_store_bytes(skb, q + 24, (void *)fe->w, 16, 0) ||
		    bpf_l4_csum_replace(skb, icmp_csum, 0, diff, 0))
			return -1;
		ports = q + 40;
	}
	if (bpf_skb_store_bytes(skb, ports + 2, &np, 2, 0) || bpf_l4_csum_replace(skb, icmp_csum, op, np, 2))
		return -1;
	if (!__builtin_memcmp(p->saddr, p->inner_daddr, 16)) {
		if (p->family == 4) {
			if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), &fe->w[3], 4, 0) ||
			    bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), p->saddr[3], fe->w[3], 4))
				return -1;
		} else {
			diff = bpf_csum_diff(p->saddr, 16, (void *)fe->w, 16, 0);
			if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), (void *)fe->w, 16, 0) ||
			    bpf_l4_csum_replace(skb, icmp_csum, 0, diff, BPF_F_PSEUDO_HDR))
				return -1;
		}
		__builtin_memcpy(p->saddr, fe->w, 16);
	}
	__builtin_memcpy(p->inner_daddr, fe->w, 16);
	p->inner_dport = fe_port;
	return 0;
}

/* untranslate gives an allowed reply of a translated flow the frontend's
 * address as its source: the client sent to the frontend and hears from
 * it. */
static __always_inline int untranslate(struct pctx *c, struct flow *f, int reason)
{
	if (!(f->ct->flags & CT_F_SVC_REPLY))
		return reason;
	if (rewrite(c->skb, c->p, 0, (struct addr16 *)f->ct->nat_addr, f->ct->nat_port))
		return REASON_DROP_MALFORMED;
	return reason;
}

/* report_known reports the verdict on a packet of a known flow: an event
 * only for a drop. The peer is looked up only when something shows it (a
 * drop's event, the debug trace): the flow's decision may not have. */
static __always_inline int report_known(struct pctx *c, struct hook_ep *h, struct flow *f, int reason)
{
	int drop = is_drop(reason);

	return report(c, h, drop || debugging(c) ? peer(c, h, f) : f->peer, reason, drop);
}

/* check decides a parsed packet at one hook of the endpoint h and reports
 * the verdict as that hook: conntrack says what the packet is to its
 * flow, a Service's address is translated, policy decides, and the
 * verdict says what conntrack keeps. With no_new, a packet that would
 * start a flow is neither decided nor reported: check returns
 * CHECK_STACK. f gets the flow's conntrack flags and, for a new flow
 * leaving a pod, the local pod it goes to. */
static __always_inline int check(struct pctx *c, struct hook_ep *h, int no_new, struct flow *f)
{
	enum ct_status st;
	int reason;

	c->svc_new = 0; /* a pick is the check's that made it */
	st = ct_lookup(c, h, f);
	st = translate(c, h, f, st);
	reason = policy_check(c, h, f, st, no_new);
	switch (reason) {
	case CHECK_STACK:
		return CHECK_STACK;
	case REASON_DROP_NO_ENDPOINT:
		return report(c, h, 0, reason, 1);
	case REASON_DROP_REVOKED:
		bpf_map_delete_elem(f->table, &f->key);
		ct_removed(ep_state(h), f->kscope);
		return report(c, h, peer(c, h, f), reason, 1);
	case REASON_ALLOW_ESTABLISHED:
	case REASON_ALLOW_REPLY:
		if (!f->touched)
			ct_touch(f->ct, c->p, c->now, reason == REASON_ALLOW_REPLY);
		f->flags = f->ct->flags;
		if (reason == REASON_ALLOW_REPLY)
			reason = untranslate(c, f, reason);
		return report_known(c, h, f, reason);
	case REASON_ALLOW_RELATED:
		if (h->scope == SCOPE_INGRESS && f->kscope == SCOPE_EGRESS && f->ct && (f->ct->flags & CT_F_SVC_REPLY) &&
		    has_ports(c->p->inner_proto) &&
		    untranslate_related(c->skb, c->p, (struct addr16 *)f->ct->nat_addr, f->ct->nat_port))
			reason = REASON_DROP_MALFORMED;
		return report_known(c, h, f, reason);
	case REASON_ALLOW_RULE:
	case REASON_ALLOW_OPEN:
	case REASON_ALLOW_HOST:
		ct_create(c, h, f, reason);
		return report(c, h, f->peer, reason, 1);
	default:
		/* a drop of a new flow, or a deny rule on a related packet or a reply */
		return report(c, h, peer(c, h, f), reason, st == CT_NEW);
	}
}

static __always_inline __u16 csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

/* hop rewrites the Ethernet addresses to mac (destination, then source)
 * and counts the hop in the TTL or hop limit, as the node's routing would
 * for a packet it forwards. The helpers write only those bytes: a direct
 * packet write would make the verifier unclone every packet's head first,
 * which is what the pull in parse() avoids. An IPv4 header's TTL,
 * protocol and checksum are adjacent: the checksum is updated here
 * (RFC 1624) and the three written at once, one helper call, not two. */
static __always_inline int hop(struct __sk_buff *skb, struct pkt *p, const __u8 *mac)
{
	if (mac && bpf_skb_store_bytes(skb, 0, mac, 12, 0))
		return -1;
	if (p->family == 4) {
		void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
		struct iphdr *ip = data + ETH_HLEN;
		__u16 w[2], old;

		if ((void *)(ip + 1) > end)
			return -1;
		__builtin_memcpy(&old, &ip->ttl, 2);
		((__u8 *)w)[0] = ip->ttl - 1;
		((__u8 *)w)[1] = ip->protocol;
		w[1] = csum_fold((__u16)~ip->check + (__u16)~old + w[0]);
		if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), w, 4, 0))
			return -1;
	} else {
		__u8 hops = p->ttl - 1;

		if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, hop_limit), &hops, 1, 0))
			return -1;
	}
	return 0;
}

/* deliver hands a packet allowed into the local pod behind lp straight to
 * it, past the node's routing and the pod's own to_pod (whose check the
 * caller made). */
static __always_inline int deliver(struct __sk_buff *skb, struct pkt *p, struct local_pod *lp)
{
	if (hop(skb, p, lp->mac))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(lp->ifindex, 0);
}

/* QUOTE_MAX bounds what a rejection quotes of the packet it refuses:
 * its IP header (with IPv6 extension headers) and its L4 header up to
 * the checksum: the pod's stack reads the first 8 bytes to find the
 * socket, and a packet whose checksum is still to be computed
 * (CHECKSUM_PARTIAL, as a pod's TCP segments leave its veth) cannot be
 * cut short of its checksum field. */
#define QUOTE_MAX 128

/* reject answers a new flow to a frontend without backends as kube-proxy
 * does: an ICMP port unreachable (ICMPv6 for IPv6) from the frontend,
 * which the pod's connect() or send() reports as refused. The packet
 * itself becomes the answer, quoting its own headers, and goes back into
 * the pod through its host veth's peer, past to_pod: it answers the pod's
 * own packet. Its own function: it needs a stack of its own. */
__noinline int reject(struct __sk_buff *skb, __u32 l4_off, __u32 family, __u32 proto)
{
	__u32 qlen = l4_off - ETH_HLEN + (proto == IPPROTO_TCP ? 20 : proto == IPPROTO_SCTP ? 12 : 8), iplen = family == 4 ? 20 : 40, w, hdr[5] = {};
	__u8 mac[12], icmp[8] = {};
	__u64 sum = 0;

	if (!skb)
		return TC_ACT_SHOT;
	if (qlen > QUOTE_MAX)
		qlen = QUOTE_MAX;
	/* The internet checksum is a sum of 16-bit words in either byte
	 * order: the words are summed as they lie. The quote is the packet's
	 * own first qlen bytes past Ethernet. */
	for (int i = 0; i < QUOTE_MAX / 4; i++) {
		if (i * 4 >= qlen)
			break;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + i * 4, &w, 4))
			return TC_ACT_SHOT;
		sum += w;
	}
	if (bpf_skb_load_bytes(skb, 0, mac + 6, 6) || bpf_skb_load_bytes(skb, 6, mac, 6))
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + qlen, 0) ||
	    bpf_skb_adjust_room(skb, iplen + sizeof(icmp), BPF_ADJ_ROOM_MAC, 0) ||
	    bpf_skb_store_bytes(skb, 0, mac, sizeof(mac), 0))
		return TC_ACT_SHOT;
	/* The quote now starts past the new headers; the answer goes from
	 * the quote's destination to its source. */
	l4_off = ETH_HLEN + iplen + sizeof(icmp);
	if (family == 4) {
		struct iphdr *ip = (struct iphdr *)hdr;

		ip->version = 4;
		ip->ihl = 5;
		ip->ttl = 64;
		ip->protocol = IPPROTO_ICMP;
		ip->tot_len = bpf_htons(iplen + sizeof(icmp) + qlen);
		if (bpf_skb_load_bytes(skb, l4_off + 12, &ip->daddr, 4) ||
		    bpf_skb_load_bytes(skb, l4_off + 16, &ip->saddr, 4))
			return TC_ACT_SHOT;
		ip->check = csum_fold(bpf_csum_diff(NULL, 0, hdr, sizeof(hdr), 0));
		if (bpf_skb_store_bytes(skb, ETH_HLEN, hdr, sizeof(hdr), 0))
			return TC_ACT_SHOT;
		icmp[0] = 3; /* destination unreachable: port unreachable */
		icmp[1] = 3;
	} else {
		/* version, payload length, next header, hop limit */
		hdr[0] = bpf_htonl(6 << 28);
		hdr[1] = bpf_htonl((sizeof(icmp) + qlen) << 16 | IPPROTO_ICMPV6_ << 8 | 64);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, hdr, 8, 0))
			return TC_ACT_SHOT;
		/* the pseudo-header: length and next header, then the addresses
		 * (source, then destination: the quote's are the other way) */
		sum += bpf_htonl(sizeof(icmp) + qlen) + bpf_htonl(IPPROTO_ICMPV6_);
		for (int i = 0; i < 8; i++) {
			if (bpf_skb_load_bytes(skb, l4_off + 8 + i * 4, &w, 4) ||
			    bpf_skb_store_bytes(skb, ETH_HLEN + 8 + ((i + 4) % 8) * 4, &w, 4, 0))
				return TC_ACT_SHOT;
			sum += w;
		}
		icmp[0] = 1; /* destination unreachable: port unreachable */
		icmp[1] = 4;
	}
	sum += (__u32)bpf_csum_diff(NULL, 0, (void *)icmp, sizeof(icmp), 0);
	*(__u16 *)&icmp[2] = csum_fold(sum);
	if (bpf_skb_store_bytes(skb, ETH_HLEN + iplen, icmp, sizeof(icmp), 0))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/* source_ok is the spoof check: a packet leaving a pod carries the pod's
 * own address. Neighbour discovery may also come from the pod's
 * link-local address, or from :: while the pod checks that its address
 * is free (RFC 4862); both stay on the link. */
static __always_inline int source_ok(struct endpoint *ep, struct pkt *p, int nd)
{
	if (p->family == 4)
		return (ep->flags & EP_HAS_V4) && p->saddr[3] == *(__u32 *)ep->ipv4;
	if ((ep->flags & EP_HAS_V6) && !__builtin_memcmp(p->saddr, ep->ipv6, 16))
		return 1;
	return nd && ((bpf_ntohl(p->saddr[0]) & 0xffc00000) == 0xfe800000 ||
		      !(p->saddr[0] | p->saddr[1] | p->saddr[2] | p->saddr[3]));
}

/* pass lets a packet go on its way, remembering a first fragment's ports
 * for the fragments that follow it. */
static __always_inline int pass(struct pkt *p)
{
	if (p->frag_first)
		frag_first(p);
	return TC_ACT_OK;
}

/* hairpin takes a pod's packet to itself through a frontend (its own
 * Service), which from_pod allowed as its egress, through its ingress
 * and back into it. The pod's kernel drops a packet from its own address
 * arriving on its interface, and would answer one to its own address
 * inside, never back through its interface. So a forward packet arrives
 * from the frontend's address (with the client's port: the backend sees
 * the frontend as its client) and the backend's answer, addressed there,
 * leaves the pod, and is turned back into the pod's address before the
 * pod's own check as the client (which gives it the frontend's address
 * as its source). The ingress check knows its peer as the pod itself: the
 * entry it creates says so (CT_F_HAIRPIN). */
static __always_inline int hairpin(struct pctx *c, struct hook_ep *h, struct flow *f, int reason)
{
	struct pkt *p = c->p;
	struct hook_ep self = { .ifindex = h->ifindex, .ep = h->ep, .scope = SCOPE_INGRESS };
	int reply = reason == REASON_ALLOW_REPLY;
	__u8 mac[12];

	if (reply ? rewrite(c->skb, p, 1, (struct addr16 *)p->saddr, p->dport)
		  : rewrite(c->skb, p, 0, (struct addr16 *)p->orig_addr, p->sport))
		return TC_ACT_SHOT;
	hook_open(&self);
	__builtin_memset(f, 0, sizeof(*f));
	f->peer = reply ? ID_ANY : h->ep->identity;
	c->hairpin = !reply;
	reason = check(c, &self, reply, f);
	if (reason == CHECK_STACK)
		return pass(p); /* the client's flow is gone: as handle() does */
	if (is_drop(reason))
		return TC_ACT_SHOT;
	pass(p);
	if (bpf_skb_load_bytes(c->skb, 0, mac, 12) || bpf_skb_store_bytes(c->skb, 0, mac + 6, 6, 0) ||
	    bpf_skb_store_bytes(c->skb, 6, mac, 6, 0))
		return TC_ACT_SHOT;
	return bpf_redirect_peer(h->ifindex, 0);
}

/* remote_range is the range of another node's pods addr is in, or NULL. */
static __always_inline struct remote_range *remote_range(const __u32 *addr)
{
	struct ipcache_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&remote_cidrs, &k);
}

/* NEXTHOP_FOR is how long a range's kept next hop (struct nexthop) serves
 * its packets before the FIB is asked again, in the units of
 * nexthop.asked (2^20 ns): about a second, so that a route or a neighbour
 * that changes holds the range's packets on its old way no longer than
 * that. */
#define NEXTHOP_FOR 1000

/* forward_remote sends a packet a local pod sent, and its own egress
 * allowed, to a pod of the other node's range r the way the node's
 * routing would (its FIB, its neighbours, the path MTU, one hop off the
 * TTL) but without the forwarding path and netfilter; from_net on the
 * other node takes it in the same way, so netfilter sees neither
 * direction of such a flow and never meets a reply of a flow it did not
 * see start (kube-proxy drops those as INVALID). Whatever the FIB does not
 * answer plainly (forwarding off, no route, a packet over the MTU, an
 * unreachable or blackhole route) goes to the stack, which answers with
 * the ICMP errors those need. The FIB's answer is kept in r, so the
 * range's next packets, of this flow or any other, skip the lookup, which
 * costs more than the whole policy decision: for packets no larger than
 * the answer was checked for (a GSO packet's segments are checked against
 * the device each time, as the stack's forwarding does), for
 * NEXTHOP_FOR. The path MTU is the route's: a smaller one the node
 * learned for one destination of the range (an ICMP "fragmentation
 * needed" from the underlay) holds once the answer is asked again, within
 * NEXTHOP_FOR. Two CPUs that ask at once may interleave their writes;
 * both write the route's one answer. Not inlined: its lookup's parameters
 * would not fit the stack from_pod has left. */
static __noinline int forward_remote(struct __sk_buff *skb, struct pkt *p, __u32 ifindex, struct remote_range *r,
				     __u64 now)
{
	struct bpf_fib_lookup fib = { .ifindex = ifindex, .l4_protocol = p->proto };
	struct nexthop *nh = &r->nh;
	__u32 mtu = 0, len = skb->len - ETH_HLEN, asked = now >> 20;
	__u8 mac[12];
	long ret;

	if (nh->ifindex && asked - nh->asked < NEXTHOP_FOR && (skb->gso_size || len <= nh->max_len)) {
		if (skb->gso_size &&
		    bpf_check_mtu(skb, nh->ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) != BPF_MTU_CHK_RET_SUCCESS)
			return TC_ACT_OK;
		if (hop(skb, p, nh->dmac))
			return TC_ACT_SHOT;
		return bpf_redirect(nh->ifindex, 0);
	}
	if (p->family == 4) {
		fib.family = AF_INET_;
		fib.ipv4_src = p->saddr[3];
		fib.ipv4_dst = p->daddr[3];
	} else {
		fib.family = AF_INET6_;
		__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, p->daddr, 16);
	}
	/* The lookup checks the path MTU against the packet's length; a GSO
	 * packet is checked segment by segment against the device's instead,
	 * as the stack's forwarding does. */
	if (!skb->gso_size)
		fib.tot_len = len;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (!fib.tot_len && bpf_check_mtu(skb, fib.ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) != BPF_MTU_CHK_RET_SUCCESS)
		return TC_ACT_OK;
	/* No neighbour entry yet: the kernel resolves it for this packet,
	 * looking the route up again (only until the entry exists, so the
	 * next hop is not kept on the stack, nor in the range's entry). */
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		if (hop(skb, p, NULL))
			return TC_ACT_SHOT;
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
	__builtin_memcpy(mac, fib.dmac, 6);
	__builtin_memcpy(mac + 6, fib.smac, 6);
	/* A later answer for a larger packet raises the size the kept one
	 * holds for; a new one starts from this packet. */
	if (nh->ifindex != fib.ifindex || asked - nh->asked >= NEXTHOP_FOR)
		nh->max_len = 0;
	if (!skb->gso_size && len > nh->max_len)
		nh->max_len = len < 0xffff ? len : 0xffff;
	__builtin_memcpy(nh->dmac, mac, 12);
	nh->asked = asked;
	nh->ifindex = fib.ifindex;
	if (hop(skb, p, mac))
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

/* routed passes a packet from_pod allowed and routing is to take: past
 * the node's forwarding when it goes to another node's pod, to the stack
 * otherwise (a pod's traffic leaving the cluster, to the node, or a hop
 * limit routing has to refuse). */
static __always_inline int routed(struct pctx *c, __u32 ifindex)
{
	struct pkt *p = c->p;
	struct remote_range *r;

	pass(p);
	if (p->ttl <= 1)
		return TC_ACT_OK;
	r = remote_range(p->daddr);
	if (!r)
		return TC_ACT_OK;
	return forward_remote(c->skb, p, ifindex, r, c->now);
}

static __always_inline int handle(struct __sk_buff *skb, const __u8 scope)
{
	struct pkt p = {};
	struct hook_ep h = { .ifindex = skb->ifindex, .scope = scope }, dh = { .scope = SCOPE_INGRESS };
	struct pctx c = { .skb = skb, .p = &p };
	struct flow f = {};
	struct local_pod *lp;
	__u32 zero = 0;
	int ret, reason;

	h.from_host = scope == SCOPE_INGRESS && skb->ingress_ifindex == 0;
	ret = parse(skb, &p);
	if (ret == PARSE_NONIP) {
		count(REASON_ALLOW_NONIP, scope, skb->len);
		return TC_ACT_OK;
	}
	c.cfg = bpf_map_lookup_elem(&config, &zero);
	c.rev = c.cfg ? c.cfg->rev : 0;
	hook_endpoint(&h);
	hook_open(&h);
	if (ret == PARSE_MALFORMED) {
		report(&c, &h, 0, REASON_DROP_MALFORMED, 1);
		return TC_ACT_SHOT;
	}
	if (!h.ep) {
		report(&c, &h, 0, REASON_DROP_NO_ENDPOINT, 1);
		return TC_ACT_SHOT;
	}
	if (scope == SCOPE_EGRESS && !source_ok(h.ep, &p, ret == PARSE_ND)) {
		report(&c, &h, peer_identity(&p, scope, h.from_host), REASON_DROP_SPOOF, 1);
		return TC_ACT_SHOT;
	}
	if (ret == PARSE_ND) {
		count(REASON_ALLOW_ND, scope, skb->len);
		return TC_ACT_OK;
	}
	if (ret == PARSE_FRAG_UNKNOWN) {
		report(&c, &h, peer_identity(&p, scope, h.from_host), REASON_DROP_FRAG, 1);
		return TC_ACT_SHOT;
	}

	/* Conntrack deadlines are seconds apart: the tick-grained clock
	 * serves them and costs a memory read, where the precise one costs a
	 * clock read on every packet. */
	c.now = bpf_ktime_get_coarse_ns();
	reason = check(&c, &h, 0, &f);
	if (reason == REASON_DROP_NO_BACKEND)
		return reject(skb, p.l4_off, p.family, p.proto);
	if (is_drop(reason))
		return TC_ACT_SHOT;
	if (scope == SCOPE_EGRESS &&
	    ((p.xlated == 1 && !__builtin_memcmp(p.saddr, p.daddr, 16)) || (f.flags & CT_F_HAIRPIN)))
		return hairpin(&c, &h, &f, reason);
	if (scope == SCOPE_INGRESS)
		return pass(&p);
	if (f.flags & CT_F_ROUTED)
		return routed(&c, h.ifindex);

	/* A packet for a pod on this node goes to it directly, checked here
	 * against that pod's ingress as its to_pod would. Routing it through
	 * the node costs more than both checks. A reply whose flow this node
	 * never saw leave a local pod (check says CHECK_STACK) is one the
	 * node translated, such as a Service's: only the stack can undo
	 * that, so it goes there, and to_pod checks it after. So does a
	 * packet whose hop limit routing would have to refuse. */
	lp = f.lp ? f.lp : bpf_map_lookup_elem(&local_pods, p.daddr);
	if (!lp)
		return routed(&c, h.ifindex);
	if (lp->ifindex == h.ifindex || p.ttl <= 1 || !hook_local(&dh, lp))
		return pass(&p);
	__builtin_memset(&f, 0, sizeof(f));
	reason = check(&c, &dh, reason == REASON_ALLOW_REPLY, &f);
	if (reason == CHECK_STACK)
		return pass(&p);
	if (is_drop(reason))
		return TC_ACT_SHOT;
	pass(&p);
	return deliver(skb, &p, lp);
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	return handle(skb, SCOPE_EGRESS);
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	return handle(skb, SCOPE_INGRESS);
}

/* from_net runs on the TC ingress of the devices that carry routes to
 * other nodes (the uplink, idcni_vxlan). A packet from another node's pod
 * to a pod here is checked against that pod's ingress exactly as its
 * to_pod would and handed to it directly: the other half of
 * forward_remote. Only a bare SYN may start a flow here: any other
 * packet conntrack does not know may be the reply to a Service address
 * the local pod dialled, which this node translated on the way out and
 * only its stack can translate back, so it goes there (and to to_pod
 * after), as from_pod's local delivery does with such replies. Anything
 * else (the node's own traffic, a NodePort's, the world's, what the
 * datapath cannot parse) goes on untouched. */
SEC("tc")
int from_net(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct hook_ep dh = { .scope = SCOPE_INGRESS, .from_net = 1 };
	struct pctx c = { .skb = skb, .p = &p };
	struct flow df = {};
	struct local_pod *lp;
	__u32 zero = 0;
	int reason;

	if (parse(skb, &p) != PARSE_OK || p.ttl <= 1)
		return TC_ACT_OK;
	lp = bpf_map_lookup_elem(&local_pods, p.daddr);
	if (!lp || !remote_range(p.saddr) || !hook_local(&dh, lp))
		return TC_ACT_OK;
	c.cfg = bpf_map_lookup_elem(&config, &zero);
	c.rev = c.cfg ? c.cfg->rev : 0;
	c.now = bpf_ktime_get_coarse_ns();
	reason = check(&c, &dh, !bare_syn(&p), &df);
	if (reason == CHECK_STACK)
		return TC_ACT_OK;
	if (is_drop(reason))
		return TC_ACT_SHOT;
	pass(&p);
	return deliver(skb, &p, lp);
}
