/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The upgrade from 0.3: give connected sockets their reverse state in their own storage (bl_sks_v1).
 *
 * Up to 0.3, connect4/6 recorded what a connected socket asked for and where it really goes in bl_sock_v2, a
 * hash keyed by socket cookie, and a cgroup/sock_release hook deleted the entry. The current programs read
 * only bl_sks_v1, so a socket connected through a frontend before the upgrade would show its backend to
 * getpeername()/recvmsg() and be missed by UDP socket termination. Once, after the new programs are attached
 * and while 0.3's sock_release still runs, the agent (datapath/sockmigrate.py) reads the two iterators below
 * in every network namespace where the datapath's sockets can be: each TCP or UDP socket whose cookie was
 * generated and is in bl_sock_v2 gets bl_sks_v1 storage holding the same pair. A socket that has storage
 * already keeps it: it connected again through a frontend after the new programs were attached, so its own
 * state is newer (or it is this run's, the socket shown again after its record overflowed the output).
 * One record (struct bl_term_rec) per socket found goes to the iterator's output for the agent to count:
 * err 0 migrated (or found migrated), -EEXIST its own newer state kept, -ENOMEM no storage could be made.
 * Then the agent unpins bl_sock_v2 and detaches 0.3's sock_release.
 *
 * Both maps are declared in balancing.h (BL_OBJ_SOCKMIGRATE); the loader points them at their pins.
 * No vmlinux.h: the few kernel types it reads are declared below with CO-RE relocations, so the object
 * builds anywhere `make bpf` does and runs on any kernel with BTF.
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#define BL_OBJ_SOCKMIGRATE /* the maps of balancing.h this object carries */
#include "balancing.h"
#include "iter.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define BL_TCP_TIME_WAIT    6  /* no full socket behind it: it cannot hold storage */
#define BL_TCP_NEW_SYN_RECV 12 /* likewise (a request being accepted, never a connect()) */

/* Kernel types, only the members read here: libbpf relocates each access against the kernel's BTF. */
typedef struct {
	__s64 counter;
} atomic64_t;

struct sock_common {
	volatile unsigned char skc_state;
	atomic64_t skc_cookie; /* 0 until something asks for it; read here without generating one */
} __attribute__((preserve_access_index));

static __always_inline int same_pair(const struct bl_sock_rev *a, const struct bl_sock_rev *b)
{
	return a->frontend.addr[0] == b->frontend.addr[0] && a->frontend.addr[1] == b->frontend.addr[1] &&
	       a->frontend.addr[2] == b->frontend.addr[2] && a->frontend.addr[3] == b->frontend.addr[3] &&
	       a->frontend.port == b->frontend.port && a->frontend.svc_id == b->frontend.svc_id &&
	       a->backend_addr[0] == b->backend_addr[0] && a->backend_addr[1] == b->backend_addr[1] &&
	       a->backend_addr[2] == b->backend_addr[2] && a->backend_addr[3] == b->backend_addr[3] &&
	       a->backend_port == b->backend_port;
}

/* The worker: copy the socket's 0.3 entry, if it has one, into its storage; one record per socket found. */
static __always_inline int migrate(struct seq_file *seq, struct sock_common *sk)
{
	struct bl_term_rec rec = {};
	struct bl_sock_rev pair, *legacy, *st;
	__u64 cookie;

	cookie = sk->skc_cookie.counter; /* a socket never asked for one cannot be in bl_sock_v2 */
	if (!cookie)
		return 0;
	legacy = bpf_map_lookup_elem(&bl_sock_v2, &cookie);
	if (!legacy)
		return 0;
	pair = *legacy;
	rec.cookie = cookie;
	rec.svc_id = pair.frontend.svc_id;
	st = bpf_sk_storage_get(&bl_sks_v1, sk, 0, 0);
	if (st)
		rec.err = same_pair(st, &pair) ? 0 : -EEXIST;
	else
		rec.err = bpf_sk_storage_get(&bl_sks_v1, sk, &pair, BPF_SK_STORAGE_GET_F_CREATE) ? 0 : -ENOMEM;
	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}

SEC("iter/tcp")
int bl_sockmigrate_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;

	if (!sk || sk->skc_state == BL_TCP_TIME_WAIT || sk->skc_state == BL_TCP_NEW_SYN_RECV)
		return 0;
	return migrate(ctx->meta->seq, sk);
}

SEC("iter/udp")
int bl_sockmigrate_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;

	if (!sk)
		return 0;
	return migrate(ctx->meta->seq, sk);
}
