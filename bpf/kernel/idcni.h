/* Types shared by the datapath programs and, through bpf2go, the Go side.
 * Every struct is padded by hand so its layout is the same in C and Go. */
#pragma once

#include <linux/types.h>

/* Reserved identities (DESIGN.md section 2). */
#define ID_ANY 0
#define ID_HOST 1
#define ID_WORLD 2
#define ID_UNRESOLVED 5
#define ID_REMOTE_NODE 6
#define ID_MIN_MANUAL 256
#define ID_MAX_MANUAL 65535

/* Where a check happens: SCOPE_EGRESS on the host veth's TC ingress (the
 * packet leaves the pod, the pod's egress rules apply), SCOPE_INGRESS on its
 * TC egress (the packet enters the pod). */
enum scope {
	SCOPE_EGRESS = 0,
	SCOPE_INGRESS = 1,
};

/* Policy directions, as in policy.Direction. */
#define DIR_INGRESS 1
#define DIR_EGRESS 2

/* Identity flags, as in policy.IdentityFlags. */
#define IDF_ISO_INGRESS (1 << 0)
#define IDF_ISO_EGRESS (1 << 1)
#define IDF_RULES_INGRESS (1 << 2)
#define IDF_RULES_EGRESS (1 << 3)
#define IDF_ANYPEER_INGRESS (1 << 4)
#define IDF_ANYPEER_EGRESS (1 << 5)
#define IDF_ANYPROTO_INGRESS (1 << 6)
#define IDF_ANYPROTO_EGRESS (1 << 7)

#define POLICY_MAX_ALLOW 16
#define POLICY_MAX_DENY 8

/* Why a packet passed or was dropped. Counters are kept per reason and
 * scope; events carry it. bpf/types.go names them for Go (a test holds
 * the two lists to each other). */
enum reason {
	REASON_ALLOW_NONIP = 0,       /* ARP and other non-IP frames */
	REASON_ALLOW_ND = 1,          /* IPv6 neighbour discovery and MLD */
	REASON_ALLOW_ESTABLISHED = 2, /* conntrack: forward packet of a flow */
	REASON_ALLOW_REPLY = 3,       /* conntrack: reply of a flow */
	REASON_ALLOW_RULE = 4,        /* new flow allowed by a rule */
	REASON_ALLOW_OPEN = 5,        /* new flow, subject not isolated */
	REASON_ALLOW_HOST = 6,        /* from the local node to its pod */
	REASON_ALLOW_RELATED = 7,     /* ICMP error about a tracked flow */
	REASON_DROP_NO_RULE = 8,      /* isolated, no rule allows it */
	REASON_DROP_DENY = 9,         /* a deny rule */
	REASON_DROP_SPOOF = 10,       /* source address not the pod's */
	REASON_DROP_MALFORMED = 11,   /* truncated or invalid headers */
	REASON_DROP_NO_ENDPOINT = 12, /* program on a veth with no endpoint */
	REASON_DROP_FRAG = 13,        /* fragment whose first part was not seen */
	REASON_DROP_REVOKED = 14,     /* established flow no longer allowed */
	REASON_DROP_UNKNOWN_FLOW = 15, /* mid-flow packet (a reply) of no known flow, not admitted as new */
	REASON_DROP_NO_BACKEND = 16,  /* new flow to a Service frontend without backends: rejected */
	REASON_MAX = 17,
};

/* Datapath errors counted apart from packets. */
enum stat {
	STAT_CT_INSERT_FAIL = 0,
	STAT_FRAG_INSERT_FAIL = 1,
	STAT_EVENT_LOST = 2,
	STAT_MAX = 4,
};

/* Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so
 * one trie and one conntrack table serve both families. */
struct ipcache_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct ipcache_value {
	__u32 identity;
	__u32 flags;
};

#define EP_HAS_V4 (1 << 0)
#define EP_HAS_V6 (1 << 1)

struct endpoint {
	__u32 identity;
	__u32 flags;
	__u8 ipv4[4];
	__u8 ipv6[16];
	/* The endpoint's own conntrack tables in ct_tables (and its state in
	 * ep_states): one pod's flows never evict another's. 0 is the node's
	 * shared table, for endpoints written without one (endpointctl on a
	 * veth the plugin did not make). */
	__u32 ct_slot;
	/* The datapath's own copy of the identity's flags, see subject_flags
	 * in datapath.c: one 64-bit store, so no reader sees half of it.
	 * Writers leave it 0. */
	__u64 id_flags_cache;
};

/* A pod on this node: its host veth, and the Ethernet header a packet
 * delivered to it carries (destination: the pod's interface; source: its
 * host veth, the pod's gateway). */
struct local_pod {
	__u32 ifindex;
	__u8 mac[6];
	__u8 host_mac[6];
	/* Appended in pin layout 4: the pod's conntrack slot, a copy of its
	 * endpoint's ct_slot (which never changes while the pod lives), so
	 * that a packet handed to the pod past its to_pod finds its flow
	 * without the endpoint. 0: not known (an entry of layout 3), the
	 * endpoint says. */
	__u32 ct_slot;
};

struct policy_key {
	__u32 subject;
	__u32 peer;
	__u8 dir;
	__u8 proto;
	__u16 pad;
};

struct port_range {
	__u16 lo;
	__u16 hi;
};

struct policy_value {
	__u8 allow_all;
	__u8 deny_all;
	__u8 n_allow;
	__u8 n_deny;
	struct port_range allow[POLICY_MAX_ALLOW];
	struct port_range deny[POLICY_MAX_DENY];
};

/* What the datapath counted of one conntrack table. */
struct ct_usage {
	__u32 count;   /* entries in it as the datapath counted them */
	__u32 pad;
	__u64 created; /* flows inserted */
	__u64 evicted; /* inserts into a full table: each pushed out an older flow */
};

/* Per-endpoint state, by conntrack slot. The tables' creator sets
 * ct_capacity; the datapath keeps the rest. Counters are approximate
 * under concurrent CPUs: they feed metrics, never a verdict. */
struct ep_state {
	__u32 ct_capacity;   /* entries each of the slot's two tables holds */
	__u32 ev_sent;       /* events sent in the current window */
	__u32 ev_suppressed; /* events held back since the last one sent */
	__u32 pad;
	__u64 ev_window;     /* start of the current event window (coarse ns) */
	/* by the scope of the flows' keys: [SCOPE_EGRESS] the flows the
	 * endpoint opened, [SCOPE_INGRESS] the ones it admitted */
	struct ct_usage ct[2];
};

struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 proto;
	__u8 scope;
	__u16 pad;
};

#define CT_F_SEEN_REPLY (1 << 0)
#define CT_F_CLOSING (1 << 1)
#define CT_F_REPLY_DENIED (1 << 2)
#define CT_F_SEEN_FIN_FWD (1 << 3)
#define CT_F_SEEN_FIN_REV (1 << 4)
#define CT_F_HOST (1 << 5) /* admitted as node-to-pod traffic: never re-checked */
#define CT_F_ROUTED (1 << 6) /* the flow's far end was no local pod: from_pod leaves it to routing */
#define CT_F_SVC_ORIG (1 << 7)  /* keyed by a pod's tuple to a frontend: nat_* is the backend */
#define CT_F_SVC_REPLY (1 << 8) /* keyed by the translated tuple: nat_* is the frontend replies come from */
#define CT_F_HAIRPIN (1 << 9)   /* a pod's flow to itself through a frontend, admitted by its ingress: peer is the pod */

struct ct_value {
	__u64 expires; /* bpf_ktime_get_coarse_ns() deadline */
	__u32 rev;       /* policy revision the flow was admitted under */
	__u32 reply_rev; /* revision CT_F_REPLY_DENIED was computed under */
	__u32 subject;   /* identity of the endpoint that admitted it */
	__u32 peer;
	__u32 flags;
	__u32 pad;
	/* Service translation, appended so that an entry of the layout before
	 * it, zero-extended, is a valid entry that translates nothing. With
	 * CT_F_SVC_ORIG the entry is keyed by the tuple the pod sent (to a
	 * frontend) and nat_addr:nat_port is the backend its packets go to;
	 * with CT_F_SVC_REPLY it is keyed by the translated tuple and
	 * nat_addr:nat_port is the frontend its replies come from. On an
	 * entry with neither, nat_* is unused (layout 2 kept a flow's next hop
	 * there; a later build ignores it, see struct remote_range). */
	__u8 nat_addr[16];
	__u16 nat_port; /* host byte order */
	__u16 nat_pad;
	__u32 nat_pad2;
};

/* nexthop is the FIB's last answer for the packets from_pod sends past
 * the node's forwarding to another node's pod range: the device and
 * Ethernet header to send them with, the largest packet (L3 bytes) that
 * answer was checked against the path MTU for, and when it was asked
 * (bpf_ktime_get_coarse_ns() >> 20, about milliseconds; ifindex 0: never).
 * It is kept per range, not per flow: the agent routes each range through
 * one next hop (agent/routes.go), so every flow to it shares the answer
 * and none asks the FIB for its first packet. */
struct nexthop {
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u16 max_len;
	__u16 pad;
	__u32 asked;
};

/* An entry of remote_cidrs: another node's pod range. The agent writes
 * present = 1 and nothing else; the datapath keeps nh. Appended in pin
 * layout 3 to the __u32 that was all of it, so a layout-2 entry,
 * zero-extended, is a range with no answer yet. */
struct remote_range {
	__u32 present;
	struct nexthop nh;
};

/* A Service frontend: ClusterIP (IPv4-mapped for IPv4), port, protocol. */
struct svc_key {
	__u8 addr[16];
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	__u32 id;               /* the frontend's id, allocated by the Go side */
	__u32 count;            /* backends at slots 0..count-1 of backends */
	__u32 affinity_timeout; /* sessionAffinity ClientIP, seconds; 0 none */
	__u32 pad;
};

struct backend_key {
	__u32 id;
	__u32 slot;
};

struct backend {
	__u8 addr[16];
	__u16 port; /* host byte order */
	__u16 pad;
};

struct affinity_key {
	__u32 id;
	__u8 client[16];
};

struct affinity_value {
	__u64 last_used; /* bpf_ktime_get_coarse_ns() of the last new flow */
	__u8 addr[16];   /* the backend the client's flows went to */
	__u16 port;
	__u16 pad;
	__u32 slot;      /* where it was: still there is still current */
};

struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_value {
	__u16 sport;
	__u16 dport;
};

struct config {
	__u32 rev;   /* bumped after every policy or ipcache change */
	__u32 debug; /* non-zero: seed-style lines in the trace pipe */
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

#define VERDICT_ALLOW 1
#define VERDICT_DROP 2

struct event {
	__u64 ts;
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 len;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 verdict;
	__u8 reason;
	__u8 scope;
	__u8 pad[3];
	/* events of this endpoint the rate limit held back just before this
	 * one (ep_state.ev_suppressed) */
	__u32 suppressed;
};
