/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket termination: destroy connected UDP sockets whose backend has left their frontend.
 *
 * balancing.c picks a connected socket's backend once, at connect(), and records the pair in the socket's
 * storage (bl_sks_v1). When the agent removes a backend from a UDP frontend it writes each
 * (frontend, backend) pair to bl_doom_v1 and runs this iter/udp program once in every client network
 * namespace: each UDP socket of that namespace that is connected, was translated by us (it has
 * bl_sks_v1 storage), still talks to the recorded backend and whose pair is doomed is destroyed with
 * bpf_sock_destroy() (kernel >= 6.5): the application gets ECONNABORTED and a new connect() is translated
 * again. Sockets connected straight to a pod address were never translated, so they have no bl_sks_v1
 * storage and are left alone; TCP is never iterated. One record (struct bl_term_rec) per destroyed socket
 * goes to the iterator's output for the agent to count.
 *
 * A separate object from balancing.c so that the datapath loads on kernels without the kfunc. Both maps are
 * declared in balancing.h (BL_OBJ_SOCKTERM): its loader (datapath/sockterm.py) points bl_sks_v1 at the
 * datapath's pin; bl_doom_v1 is created with each loaded copy and never pinned, so two agents on one node
 * cannot clear each other's pairs.
 * No vmlinux.h: the few kernel types it reads are declared below with CO-RE relocations, so the object
 * builds anywhere `make bpf` does and runs on any kernel with BTF.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define BL_OBJ_SOCKTERM /* the maps of balancing.h this object carries */
#include "balancing.h"
#include "iter.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define BL_AF_INET         2
#define BL_AF_INET6        10
#define BL_TCP_ESTABLISHED 1 /* a connected UDP socket's sk_state */

/* Kernel types, only the members read here: libbpf relocates each access against the kernel's BTF. */
struct sock_common {
	__be32 skc_daddr;               /* AF_INET peer address */
	__be16 skc_dport;               /* peer port, network order */
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;   /* AF_INET6 peer address (v4-mapped for IPv4 peers) */
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

static __always_inline void copy_addr(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* Whether the socket is still connected to the backend its reverse state records (it may have been
 * disconnected, or reconnected elsewhere without a translation). */
static __always_inline int peer_is_backend(const struct sock *sk, const struct bl_sock_rev *st)
{
	const struct sock_common *c = &sk->__sk_common;

	if (c->skc_dport != st->backend_port)
		return 0;
	if (c->skc_family == BL_AF_INET)
		return st->backend_addr[0] == 0 && st->backend_addr[1] == 0 &&
		       st->backend_addr[2] == bpf_htonl(0x0000ffff) && st->backend_addr[3] == c->skc_daddr;
	if (c->skc_family == BL_AF_INET6)
		return st->backend_addr[0] == c->skc_v6_daddr.in6_u.u6_addr32[0] &&
		       st->backend_addr[1] == c->skc_v6_daddr.in6_u.u6_addr32[1] &&
		       st->backend_addr[2] == c->skc_v6_daddr.in6_u.u6_addr32[2] &&
		       st->backend_addr[3] == c->skc_v6_daddr.in6_u.u6_addr32[3];
	return 0;
}

SEC("iter/udp")
int bl_sockterm_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct bl_doom_key key = { .proto = IPPROTO_UDP };
	struct bl_term_rec rec = {};
	struct bl_sock_rev *st;

	if (!sk || sk->__sk_common.skc_state != BL_TCP_ESTABLISHED)
		return 0;
	st = bpf_sk_storage_get(&bl_sks_v1, sk, 0, 0);
	if (!st || !peer_is_backend(sk, st))
		return 0; /* not translated by us (e.g. connected to a pod address), or no longer to that backend */
	copy_addr(key.frontend_addr, st->frontend.addr);
	copy_addr(key.backend_addr, st->backend_addr);
	key.frontend_port = st->frontend.port;
	key.backend_port = st->backend_port;
	if (!bpf_map_lookup_elem(&bl_doom_v1, &key))
		return 0;
	rec.cookie = bpf_get_socket_cookie(sk);
	rec.svc_id = st->frontend.svc_id;
	rec.err = bpf_sock_destroy((struct sock_common *)sk);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
