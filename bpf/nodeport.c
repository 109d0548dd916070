/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing on TC: packets from outside the cluster to a frontend served through this node
 * (its NodePort addresses, load-balancer IPs, externalIPs: BL_SVC_F_EXTERNAL in the master entry of
 * bl_svc_v1, the map the socket hooks read) get a backend from the frontend's Maglev table, then:
 *   - a pod on this node (BL_BE_F_LOCAL): the destination is translated, the client's address kept; its
 *     replies leave through a node device, where the egress program translates them back;
 *   - a backend elsewhere: the source is translated too, to this device's address (bl_nsdev_v1) and a free
 *     port of the SNAT range, so the replies come back here, where the ingress program translates them back.
 * Each flow gets two connection-tracking entries (bl_ct_v1), one per direction, each keyed by the packet as
 * it appears on the wire and saying what it becomes; a tracked flow keeps its backend while that backend
 * exists. The SNAT port is taken by inserting the reply entry with BPF_NOEXIST: the map's own atomic insert
 * is the allocation, with no lock shared by the CPUs.
 *
 * The programs leave everything else alone (TC_ACT_OK) and the kernel routes the translated packets. Only
 * Ethernet frames with IPv4 or IPv6 and TCP or UDP directly after the IP header are translated (IPv6
 * extension headers and IPv4 non-first fragments pass untouched). ICMP errors quoting a translated packet
 * are translated back too, so path MTU discovery and port-unreachable reach the client.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define BL_OBJ_NODEPORT /* the maps of balancing.h this object carries */
#include "balancing.h"
#include "accounting.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SNAT_TRIES 32              /* SNAT port candidates tried before the flow is dropped */
#define SEEN_EVERY_NS 1000000000ULL /* bl_ct_val.seen_ns is written at most once a second */
#define IP_OFFSET 0x1fff
/* ICMP error types (linux/icmp.h pulls in libc headers a BPF build does not have) */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4

/* Where a packet's fields are, and the packet as a connection-tracking key. */
struct pkt {
	struct bl_ct_key key;
	__u32 l3;          /* offset of the IP header */
	__u32 l4;          /* offset of the TCP/UDP header */
	__u32 csum;        /* offset of the L4 checksum */
	__u8 v6;
	__u8 tcp_flags;    /* TCP: the flags byte */
	__u8 udp_zero;     /* IPv4 UDP without checksum */
};

static __always_inline void set_v4(__u32 *addr, __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

static __always_inline void copy_addr(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int addr_zero(const __u32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Parse the L4 ports of TCP or UDP at ``l4`` into ``p`` (of a ``quoted`` packet, in an ICMP error: only
 * the ports, the rest may be cut off). */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, __u8 proto, int quoted)
{
	__u16 ports[2];

	p->key.proto = proto;
	if (bpf_skb_load_bytes(skb, p->l4, ports, sizeof(ports)) < 0)
		return -1;
	p->key.sport = ports[0];
	p->key.dport = ports[1];
	if (quoted)
		return 0;
	if (proto == IPPROTO_TCP) {
		__u8 flags;

		if (bpf_skb_load_bytes(skb, p->l4 + 13, &flags, 1) < 0)
			return -1;
		p->tcp_flags = flags;
		p->csum = p->l4 + offsetof(struct tcphdr, check);
	} else {
		__u16 sum;

		if (bpf_skb_load_bytes(skb, p->l4 + offsetof(struct udphdr, check), &sum, 2) < 0)
			return -1;
		p->udp_zero = !p->v6 && sum == 0;
		p->csum = p->l4 + offsetof(struct udphdr, check);
	}
	return 0;
}

/* The IP header at ``l3``: 0 and ``p`` filled for TCP/UDP; 1 for an ICMP error (``*icmp_off`` set);
 * -1 for anything else. */
static __always_inline int parse_ip(struct __sk_buff *skb, __u32 l3, __u16 eth_proto, struct pkt *p,
				    __u32 *icmp_off, int quoted)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->l3 = l3;
	if (eth_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
			return -1;
		if (ip.frag_off & bpf_htons(IP_OFFSET))
			return -1; /* a later fragment: no L4 header */
		set_v4(p->key.src, ip.saddr);
		set_v4(p->key.dst, ip.daddr);
		p->l4 = l3 + ip.ihl * 4;
		if (ip.protocol == IPPROTO_ICMP && !quoted) {
			*icmp_off = p->l4;
			return 1;
		}
		if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
			return -1;
		return parse_l4(skb, p, ip.protocol, quoted) < 0 ? -1 : 0;
	}
	if (eth_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)) < 0)
			return -1;
		p->v6 = 1;
		__builtin_memcpy(p->key.src, &ip6.saddr, 16);
		__builtin_memcpy(p->key.dst, &ip6.daddr, 16);
		p->l4 = l3 + sizeof(ip6);
		if (ip6.nexthdr == IPPROTO_ICMPV6 && !quoted) {
			*icmp_off = p->l4;
			return 1;
		}
		if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP)
			return -1;
		return parse_l4(skb, p, ip6.nexthdr, quoted) < 0 ? -1 : 0;
	}
	return -1;
}

/* --- rewriting --------------------------------------------------------------------------------------- */

/* Replace one address (source if ``dst`` is 0) and fix the checksums (``csum_l4``: the L4 checksum's
 * offset, 0 for none; ``pseudo``: whether that checksum covers the address). */
static __always_inline int write_addr(struct __sk_buff *skb, __u32 l3, int v6, int dst, const __u32 *old,
				      const __u32 *new, __u32 csum_l4, int pseudo, int udp)
{
	__u64 l4flags = (pseudo ? BPF_F_PSEUDO_HDR : 0) | (udp ? BPF_F_MARK_MANGLED_0 : 0);

	if (!v6) {
		__u32 off = l3 + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));

		if (old[3] == new[3])
			return 0;
		if (csum_l4 && bpf_l4_csum_replace(skb, csum_l4, old[3], new[3], l4flags | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), old[3], new[3], 4) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, off, &new[3], 4, 0);
	} else {
		__u32 off = l3 + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
		__s64 diff;

		if (addr_eq(old, new))
			return 0;
		diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new, 16, 0);
		if (csum_l4 && bpf_l4_csum_replace(skb, csum_l4, 0, diff, l4flags) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, off, new, 16, 0);
	}
}

static __always_inline int write_port(struct __sk_buff *skb, __u32 off, __u16 old, __u16 new, __u32 csum_l4,
				      int udp)
{
	if (old == new)
		return 0;
	if (csum_l4 && bpf_l4_csum_replace(skb, csum_l4, old, new, (udp ? BPF_F_MARK_MANGLED_0 : 0) | 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 2, 0);
}

/* Rewrite a TCP/UDP packet as a connection-tracking entry says. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p, const struct bl_ct_val *ct)
{
	int udp = p->key.proto == IPPROTO_UDP;
	__u32 csum = p->udp_zero ? 0 : p->csum;

	if (write_addr(skb, p->l3, p->v6, 0, p->key.src, ct->src, csum, 1, udp) < 0 ||
	    write_addr(skb, p->l3, p->v6, 1, p->key.dst, ct->dst, csum, 1, udp) < 0 ||
	    write_port(skb, p->l4, p->key.sport, ct->sport, csum, udp) < 0 ||
	    write_port(skb, p->l4 + 2, p->key.dport, ct->dport, csum, udp) < 0)
		return -1;
	return 0;
}

/*
 * Send a translated packet of a source-NATed flow on to its next hop, past the stack's routing: after the
 * translation one of its addresses is this node's own (the SNAT source towards the backend, the NodePort
 * address towards the client), which the stack would drop as a martian on input. The FIB says where it goes;
 * the TTL / hop limit is decremented as a router does. Anything the FIB cannot forward (no route, TTL
 * exhausted, too big for the egress MTU) is left to the stack, which answers with the ICMP error.
 */
static __always_inline int forward(struct __sk_buff *skb, const struct pkt *p, const struct bl_ct_val *ct)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr eth;
	__u8 ttl;
	long rc;

	fib.ifindex = skb->ifindex;
	fib.l4_protocol = p->key.proto;
	fib.sport = ct->sport;
	fib.dport = ct->dport;
	if (!p->v6) {
		fib.family = 2; /* AF_INET */
		fib.ipv4_src = ct->src[3];
		fib.ipv4_dst = ct->dst[3];
		if (bpf_skb_load_bytes(skb, p->l3 + offsetof(struct iphdr, ttl), &ttl, 1) < 0)
			return TC_ACT_OK;
	} else {
		fib.family = 10; /* AF_INET6 */
		copy_addr(fib.ipv6_src, ct->src);
		copy_addr(fib.ipv6_dst, ct->dst);
		if (bpf_skb_load_bytes(skb, p->l3 + offsetof(struct ipv6hdr, hop_limit), &ttl, 1) < 0)
			return TC_ACT_OK;
	}
	if (ttl <= 1)
		return TC_ACT_OK;
	/* a GRO packet is segmented for the egress device on transmit: only a single one is checked */
	if (!skb->gso_size)
		fib.tot_len = (__u16)(skb->len - ETH_HLEN);
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (!p->v6) {
		__u16 old = bpf_htons((__u16)ttl << 8), new = bpf_htons((__u16)(ttl - 1) << 8);

		if (bpf_l3_csum_replace(skb, p->l3 + offsetof(struct iphdr, check), old, new, 2) < 0)
			return TC_ACT_SHOT;
		ttl -= 1;
		if (bpf_skb_store_bytes(skb, p->l3 + offsetof(struct iphdr, ttl), &ttl, 1, 0) < 0)
			return TC_ACT_SHOT;
	} else {
		ttl -= 1;
		if (bpf_skb_store_bytes(skb, p->l3 + offsetof(struct ipv6hdr, hop_limit), &ttl, 1, 0) < 0)
			return TC_ACT_SHOT;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	__builtin_memcpy(eth.h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth.h_source, fib.smac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, 2 * ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

/* --- accounting -------------------------------------------------------------------------------------- */

static __always_inline void account(__u32 svc_id, __u8 result, __u8 hook, const struct pkt *p,
				    const __u32 *backend, __u16 backend_port, __u32 ifindex)
{
	const struct bl_config *cfg;
	struct bl_event *ev;
	__u32 zero = 0;

	bl_count(svc_id, result, p->key.proto, hook);
	cfg = bpf_map_lookup_elem(&bl_cfg_v3, &zero);
	ev = bl_event_reserve(cfg);
	if (!ev)
		return;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->svc_id = svc_id;
	copy_addr(ev->orig_addr, p->key.dst);
	ev->orig_port = p->key.dport;
	if (backend) {
		copy_addr(ev->backend_addr, backend);
		ev->backend_port = backend_port;
	}
	ev->hook = hook;
	ev->proto = p->key.proto;
	ev->result = result;
	copy_addr(ev->client_addr, p->key.src);
	ev->client_port = p->key.sport;
	ev->ifindex = ifindex;
	bl_event_submit(ev, cfg);
}

static __always_inline void nsstat(__u32 index)
{
	__u64 *count = bpf_map_lookup_elem(&bl_nsstat_v1, &index);

	if (count)
		*count += 1;
}

/* --- connection tracking ----------------------------------------------------------------------------- */

/* The TCP state a packet moves its flow to (``state`` unchanged when it says nothing new). */
static __always_inline __u8 next_state(__u8 state, const struct pkt *p, int reply)
{
	if (p->key.proto == IPPROTO_TCP && (p->tcp_flags & (0x01 | 0x04))) /* FIN, RST */
		return BL_CT_CLOSING;
	if (reply && state == BL_CT_NEW)
		return BL_CT_ESTABLISHED;
	return state;
}

/* The client direction's key of a flow, from its reply entry (which says what the reply becomes: from
 * the frontend to the client). */
static __always_inline void client_key(struct bl_ct_key *k, const struct bl_ct_val *reply, __u8 proto)
{
	__builtin_memset(k, 0, sizeof(*k));
	copy_addr(k->src, reply->dst);
	copy_addr(k->dst, reply->src);
	k->sport = reply->dport;
	k->dport = reply->sport;
	k->proto = proto;
}

/* Note a packet of a tracked flow: its time (at most once a second) and the state it moves to. */
static __always_inline void touch(struct bl_ct_val *ct, const struct pkt *p, int reply)
{
	__u64 now = bpf_ktime_get_ns();
	struct bl_ct_val *orig = ct;
	struct bl_ct_key k;
	__u8 state;

	if (now - ct->seen_ns > SEEN_EVERY_NS)
		ct->seen_ns = now;
	if (reply) {
		client_key(&k, ct, p->key.proto);
		orig = bpf_map_lookup_elem(&bl_ct_v1, &k);
		if (!orig)
			return;
		if (now - orig->seen_ns > SEEN_EVERY_NS)
			orig->seen_ns = now;
	}
	state = next_state(orig->state, p, reply);
	if (state != orig->state)
		orig->state = state;
}

/* A TCP SYN (without ACK) arriving on a flow that was closed: a new connection on a reused tuple (a client
 * behind a NAT), which picks its backend again, as netfilter's conntrack does; the old one may have left the
 * Service since. */
static __always_inline int reopened(const struct bl_ct_val *ct, const struct pkt *p)
{
	return p->key.proto == IPPROTO_TCP && ct->state == BL_CT_CLOSING && (p->tcp_flags & (0x02 | 0x10)) == 0x02;
}

/* A tracked packet: its entry, or NULL. A client-direction entry whose backend is gone, or which a new
 * connection reuses (``ingress``), is deleted (with its reply entry): the flow picks a backend again. */
static __always_inline struct bl_ct_val *tracked(const struct pkt *p, int ingress)
{
	struct bl_ct_val *ct = bpf_map_lookup_elem(&bl_ct_v1, &p->key);
	struct bl_ct_key rk;
	int again;

	if (!ct || (ct->flags & BL_CT_F_REPLY))
		return ct;
	again = ingress && reopened(ct, p);
	if (!again && bpf_map_lookup_elem(&bl_be_v1, &ct->backend_id))
		return ct;
	__builtin_memset(&rk, 0, sizeof(rk));
	copy_addr(rk.src, ct->dst);
	copy_addr(rk.dst, ct->src);
	rk.sport = ct->dport;
	rk.dport = ct->sport;
	rk.proto = p->key.proto;
	bpf_map_delete_elem(&bl_ct_v1, &rk);
	bpf_map_delete_elem(&bl_ct_v1, &p->key);
	if (!again)
		nsstat(BL_NSSTAT_BACKEND_GONE);
	return NULL;
}

/* --- new flows --------------------------------------------------------------------------------------- */

/* The Maglev index of a flow: its client and ports, not the address it was sent to, so that the same flow
 * sent to any node behind one load balancer (or ECMP route) picks the same entry. ``by_client``
 * (sessionAffinity ClientIP): the client's address alone, so all its connections pick the same entry. */
static __always_inline __u32 flow_hash(const struct bl_ct_key *k, int by_client)
{
	__u64 h = 0xcbf29ce484222325ULL;

	h = (h ^ k->src[0]) * 0x100000001b3ULL;
	h = (h ^ k->src[1]) * 0x100000001b3ULL;
	h = (h ^ k->src[2]) * 0x100000001b3ULL;
	h = (h ^ k->src[3]) * 0x100000001b3ULL;
	h = (h ^ (by_client ? 0 : ((__u32)k->sport << 16 | k->dport))) * 0x100000001b3ULL;
	h = (h ^ k->proto) * 0x100000001b3ULL;
	h ^= h >> 29;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 32;
	return (__u32)h;
}

/* Whether the client may use the frontend (loadBalancerSourceRanges). */
static __always_inline int source_allowed(__u32 svc_id, const __u32 *client)
{
	struct bl_srcr_key k = { .prefixlen = 32 + 128, .svc_id = svc_id };

	copy_addr(k.addr, client);
	return bpf_map_lookup_elem(&bl_srcr_v1, &k) != NULL;
}

/* Take a SNAT port towards the backend: insert the reply entry with a free port, tried SNAT_TRIES times.
 * 0 if none. */
static __always_inline __u16 take_snat_port(const struct bl_ns_config *cfg, struct bl_ct_key *rk,
					    const struct bl_ct_val *rv)
{
	__u32 range = (__u32)cfg->snat_max - cfg->snat_min + 1;
	__u32 start;
	int i;

	if (cfg->snat_max < cfg->snat_min || !cfg->snat_min)
		return 0;
	start = bpf_get_prandom_u32() % range;
	for (i = 0; i < SNAT_TRIES; i++) {
		/* a small range is walked in order from a random start (every port tried); in a large one each try
		 * is random: taken ports cluster (each allocation walks forward), so a walk would keep hitting a run
		 * of them at a fill where random tries rarely miss (P(all taken) = fill^32) */
		__u32 pick = range <= SNAT_TRIES ? (start + i) % range : bpf_get_prandom_u32() % range;
		__u16 port = bpf_htons((__u16)(cfg->snat_min + pick));

		rk->dport = port;
		if (bpf_map_update_elem(&bl_ct_v1, rk, rv, BPF_NOEXIST) == 0) {
			nsstat(BL_NSSTAT_SNAT_ALLOCATED);
			return port;
		}
		nsstat(BL_NSSTAT_SNAT_RETRIES);
	}
	return 0;
}

/*
 * Hairpin: whether a local backend's replies to this client would miss this device's egress program, because
 * the client is routed through another device (a pod of this node reaching a load-balancer IP that the
 * router sends back here), while the frontend is not an address of this node. The source then becomes the
 * frontend address: the backend's replies to it are routed out through this device, where the egress
 * program translates them. (To a NodePort address of its own node a pod's replies would be delivered
 * locally: not handled here; the socket hooks translate such connections before they leave the pod. So the
 * caller asks no route for a NodePort, BL_SVC_F_NODE_ADDRESS: the two FIB lookups cost every new flow.)
 */
static __always_inline int hairpin(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.ifindex = skb->ifindex;
	fib.family = p->v6 ? 10 : 2;
	if (!p->v6) {
		fib.ipv4_src = p->key.dst[3];
		fib.ipv4_dst = p->key.src[3];
	} else {
		copy_addr(fib.ipv6_src, p->key.dst);
		copy_addr(fib.ipv6_dst, p->key.src);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) || fib.ifindex == skb->ifindex)
		return 0;
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.ifindex = skb->ifindex;
	fib.family = p->v6 ? 10 : 2;
	if (!p->v6) {
		fib.ipv4_src = p->key.src[3];
		fib.ipv4_dst = p->key.dst[3];
	} else {
		copy_addr(fib.ipv6_src, p->key.src);
		copy_addr(fib.ipv6_dst, p->key.dst);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc != BPF_FIB_LKUP_RET_NOT_FWDED; /* not forwarded: delivered here, a node address */
}

/* A packet of no tracked flow: a frontend served here gets a backend and two entries; anything else passes. */
static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p)
{
	struct bl_svc_key sk = { .port = p->key.dport, .proto = p->key.proto, .scope = BL_SCOPE_PRIMARY };
	struct bl_ct_val ov = {}, rv = {};
	struct bl_ct_key rk = {};
	const struct bl_ns_config *cfg;
	const struct bl_svc_val *master;
	const struct bl_backend *be;
	__u32 zero = 0, idx, half, svc_id, *backend_id;
	__u64 *pair;
	void *table;
	__u8 result;

	copy_addr(sk.addr, p->key.dst);
	master = bpf_map_lookup_elem(&bl_svc_v1, &sk);
	if (!master || !(master->flags & BL_SVC_F_EXTERNAL))
		return TC_ACT_OK;
	svc_id = master->svc_id;
	cfg = bpf_map_lookup_elem(&bl_nscfg_v1, &zero);
	if (!cfg || !cfg->maglev_size)
		return TC_ACT_OK;
	if ((master->flags & BL_SVC_F_SRC_RANGES) && !source_allowed(svc_id, p->key.src)) {
		account(svc_id, BL_RES_DROP_SOURCE, BL_HOOK_TC_INGRESS, p, NULL, 0, skb->ifindex);
		return TC_ACT_SHOT;
	}
	result = master->flags & BL_SVC_F_ETP_LOCAL ? BL_RES_DROP_NO_LOCAL : BL_RES_DROP_NO_BACKEND;
	table = bpf_map_lookup_elem(&bl_mglv_v1, &svc_id);
	if (!table)
		goto drop;
	idx = flow_hash(&p->key, master->flags & BL_SVC_F_AFFINITY) % cfg->maglev_size;
	half = idx / 2;
	pair = bpf_map_lookup_elem(table, &half); /* entries 2k and 2k + 1, in memory order */
	if (!pair)
		goto drop;
	backend_id = (__u32 *)pair + (idx & 1);
	be = bpf_map_lookup_elem(&bl_be_v1, backend_id);
	if (!be) {
		result = BL_RES_DROP_NO_BACKEND;
		goto drop;
	}

	/* client direction: client -> frontend becomes [node ->] backend */
	copy_addr(ov.src, p->key.src);
	ov.sport = p->key.sport;
	copy_addr(ov.dst, be->addr);
	ov.dport = be->port;
	ov.svc_id = svc_id;
	ov.backend_id = *backend_id;
	ov.created_ns = ov.seen_ns = bpf_ktime_get_ns();
	ov.state = next_state(BL_CT_NEW, p, 0);
	/* reply direction: backend -> client (or node) becomes frontend -> client */
	copy_addr(rv.src, p->key.dst);
	rv.sport = p->key.dport;
	copy_addr(rv.dst, p->key.src);
	rv.dport = p->key.sport;
	rv.svc_id = svc_id;
	rv.backend_id = *backend_id;
	rv.created_ns = ov.created_ns;
	rv.seen_ns = ov.created_ns;
	copy_addr(rk.src, be->addr);
	rk.sport = be->port;
	rk.proto = p->key.proto;
	if ((be->flags & BL_BE_F_LOCAL) && !(master->flags & BL_SVC_F_NODE_ADDRESS) && hairpin(skb, p)) {
		ov.flags = BL_CT_F_LOCAL | BL_CT_F_SNAT;
		rv.flags = BL_CT_F_REPLY | BL_CT_F_LOCAL | BL_CT_F_SNAT;
		copy_addr(rk.dst, p->key.dst);
		ov.sport = take_snat_port(cfg, &rk, &rv);
		if (!ov.sport) {
			result = BL_RES_DROP_SNAT_PORTS;
			goto drop;
		}
		copy_addr(ov.src, p->key.dst);
		result = BL_RES_NS_SNAT;
	} else if (be->flags & BL_BE_F_LOCAL) {
		ov.flags = BL_CT_F_LOCAL;
		rv.flags = BL_CT_F_REPLY | BL_CT_F_LOCAL;
		copy_addr(rk.dst, p->key.src);
		rk.dport = p->key.sport;
		if (bpf_map_update_elem(&bl_ct_v1, &rk, &rv, BPF_ANY) < 0) {
			result = BL_RES_DROP_CT_FULL;
			goto drop;
		}
		result = BL_RES_NS_LOCAL;
	} else {
		__u32 ifindex = skb->ifindex;
		const struct bl_nsdev *dev = bpf_map_lookup_elem(&bl_nsdev_v1, &ifindex);
		const __u32 *node;

		if (!dev) {
			result = BL_RES_DROP_SNAT_PORTS;
			goto drop;
		}
		node = p->v6 ? dev->addr6 : dev->addr4;
		if (addr_zero(node)) {
			result = BL_RES_DROP_SNAT_PORTS;
			goto drop;
		}
		ov.flags = BL_CT_F_SNAT;
		rv.flags = BL_CT_F_REPLY | BL_CT_F_SNAT;
		copy_addr(rk.dst, node);
		ov.sport = take_snat_port(cfg, &rk, &rv);
		if (!ov.sport) {
			result = BL_RES_DROP_SNAT_PORTS;
			goto drop;
		}
		copy_addr(ov.src, node);
		result = BL_RES_NS_SNAT;
	}
	if (bpf_map_update_elem(&bl_ct_v1, &p->key, &ov, BPF_ANY) < 0) {
		bpf_map_delete_elem(&bl_ct_v1, &rk);
		result = BL_RES_DROP_CT_FULL;
		goto drop;
	}
	nsstat(BL_NSSTAT_CT_CREATED);
	account(svc_id, result, BL_HOOK_TC_INGRESS, p, ov.dst, ov.dport, skb->ifindex);
	if (rewrite(skb, p, &ov) < 0)
		return TC_ACT_SHOT;
	return ov.flags & BL_CT_F_SNAT ? forward(skb, p, &ov) : TC_ACT_OK;
drop:
	account(svc_id, result, BL_HOOK_TC_INGRESS, p, NULL, 0, skb->ifindex);
	return TC_ACT_SHOT;
}

/* --- ICMP errors ------------------------------------------------------------------------------------- */

static __always_inline int icmp_is_error(__u8 type, int v6)
{
	if (v6)
		return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
		       type == ICMPV6_PARAMPROB;
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/*
 * An ICMP error whose quoted packet belongs to a translated flow: the quoted packet went out in the flow's
 * translated form, so its reverse is one of the flow's keys, whose entry says how the peer's packets are
 * translated. The quote becomes the reverse of that translation, the outer destination the peer, and the
 * outer source the frontend when the translated address itself sent the error. Checksums: the quote's own
 * L4 checksum is often cut off and is left alone; an IPv4 quote's header checksum is fixed with its
 * addresses, which leaves the ICMP checksum unchanged by them (a header with its checksum sums to the same
 * value); ports change the ICMP checksum; ICMPv6 also sums the quote's addresses and the outer ones.
 */
static __always_inline int icmp_error(struct __sk_buff *skb, const struct pkt *outer, __u32 icmp, int ingress)
{
	__u16 eth_proto = outer->v6 ? bpf_htons(ETH_P_IPV6) : bpf_htons(ETH_P_IP);
	__u32 icmp_csum = icmp + 2, scratch = 0;
	const struct bl_ct_val *ct;
	struct bl_ct_key k = {};
	struct pkt in;
	__u8 type;

	if (bpf_skb_load_bytes(skb, icmp, &type, 1) < 0 || !icmp_is_error(type, outer->v6))
		return TC_ACT_OK;
	if (parse_ip(skb, icmp + 8, eth_proto, &in, &scratch, 1) != 0)
		return TC_ACT_OK;
	copy_addr(k.src, in.key.dst);
	copy_addr(k.dst, in.key.src);
	k.sport = in.key.dport;
	k.dport = in.key.sport;
	k.proto = in.key.proto;
	ct = bpf_map_lookup_elem(&bl_ct_v1, &k);
	if (!ct)
		return TC_ACT_OK;
	if (outer->v6) {
		__s64 diff = bpf_csum_diff(in.key.src, 16, (__be32 *)ct->dst, 16, 0);

		diff = bpf_csum_diff(in.key.dst, 16, (__be32 *)ct->src, 16, diff);
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, diff, 0) < 0)
			return TC_ACT_SHOT;
	}
	if (write_addr(skb, in.l3, in.v6, 0, in.key.src, ct->dst, 0, 0, 0) < 0 ||
	    write_addr(skb, in.l3, in.v6, 1, in.key.dst, ct->src, 0, 0, 0) < 0 ||
	    write_port(skb, in.l4, in.key.sport, ct->dport, icmp_csum, 0) < 0 ||
	    write_port(skb, in.l4 + 2, in.key.dport, ct->sport, icmp_csum, 0) < 0)
		return TC_ACT_SHOT;
	if (write_addr(skb, outer->l3, outer->v6, 1, outer->key.dst, ct->dst, outer->v6 ? icmp_csum : 0, 1, 0) < 0)
		return TC_ACT_SHOT;
	if (addr_eq(outer->key.src, in.key.dst) &&
	    write_addr(skb, outer->l3, outer->v6, 0, outer->key.src, ct->src, outer->v6 ? icmp_csum : 0, 1, 0) < 0)
		return TC_ACT_SHOT;
	/* about a source-NATed flow, arriving: it now comes from this node's address, which the stack would drop
	 * as a martian on input; sent on past it, as the flow's own replies are */
	if (ingress && (ct->flags & BL_CT_F_SNAT))
		return forward(skb, outer, ct);
	return TC_ACT_OK;
}

/* --- the programs ------------------------------------------------------------------------------------ */

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
	struct bl_ct_val *ct;
	struct pkt p;
	__u32 icmp = 0;
	int kind;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;
	kind = parse_ip(skb, ETH_HLEN, skb->protocol, &p, &icmp, 0);
	if (kind == 1)
		return icmp_error(skb, &p, icmp, ingress);
	if (kind < 0)
		return TC_ACT_OK;
	ct = tracked(&p, ingress);
	if (ct) {
		if (!ingress && !(ct->flags & BL_CT_F_REPLY))
			return TC_ACT_OK; /* a client's packet leaving again (hairpin): already translated */
		touch(ct, &p, ct->flags & BL_CT_F_REPLY);
		if (rewrite(skb, &p, ct) < 0)
			return TC_ACT_SHOT;
		return ingress && (ct->flags & BL_CT_F_SNAT) ? forward(skb, &p, ct) : TC_ACT_OK;
	}
	if (!ingress)
		return TC_ACT_OK;
	return new_flow(skb, &p);
}

SEC("tc")
int bl_ns_ingress(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("tc")
int bl_ns_egress(struct __sk_buff *skb)
{
	return handle(skb, 0);
}
