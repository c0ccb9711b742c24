// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* The benchmarks' baseline: a TC program that does nothing, so the cost of
 * the datapath can be told apart from the cost of running any program. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual MIT/GPL";

SEC("tc")
int pass(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
