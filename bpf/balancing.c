/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level load balancing on cgroup v2 hooks.
 *
 * connect4/6 and sendmsg4/6 translate a frontend (VIP:port/proto) to one of its backends before the
 * kernel routes the packet; recvmsg4/6 and getpeername4/6 translate back so applications only ever
 * see the address they asked for. Each SEC() function is a thin wrapper: it loads the family's
 * address into the family-neutral form of balancing.h, calls one worker and turns the result into
 * a verdict.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define BL_OBJ_DATAPATH /* the maps of balancing.h this object carries */
#include "balancing.h"
#include "accounting.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Worker results (errno-like, fixed meanings); the wrappers turn them into verdicts. */
enum worker_result {
	BL_PASS    = 0, /* not a frontend: untouched */
	BL_XLATED  = 1, /* rewritten to a backend */
	BL_REFUSE  = 2, /* a frontend with no usable backend: ECONNREFUSED */
};

/* The address a hook works on, in the family-neutral form of the maps. */
struct bl_sockaddr {
	__u32 addr[4];
	__u16 port;  /* network order */
};

static __always_inline void addr_from_v4(struct bl_sockaddr *sa, __u32 ip4, __u32 port)
{
	sa->addr[0] = 0;
	sa->addr[1] = 0;
	sa->addr[2] = bpf_htonl(0x0000ffff);
	sa->addr[3] = ip4;
	sa->port = (__u16)port;
}

static __always_inline int addr_is_v4(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void addr_from_v6(struct bl_sockaddr *sa, const struct bpf_sock_addr *ctx)
{
	sa->addr[0] = ctx->user_ip6[0];
	sa->addr[1] = ctx->user_ip6[1];
	sa->addr[2] = ctx->user_ip6[2];
	sa->addr[3] = ctx->user_ip6[3];
	sa->port = (__u16)ctx->user_port;
}

/* Write back with 4-byte stores only (2-byte context stores are rejected). */
static __always_inline void addr_to_v6(struct bpf_sock_addr *ctx, const struct bl_sockaddr *sa)
{
	ctx->user_ip6[0] = sa->addr[0];
	ctx->user_ip6[1] = sa->addr[1];
	ctx->user_ip6[2] = sa->addr[2];
	ctx->user_ip6[3] = sa->addr[3];
	ctx->user_port = (__u32)sa->port;
}

static __always_inline void copy_addr(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline void clear_addr_words(__u32 *addr)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = 0;
	addr[3] = 0;
}

static __always_inline void clear_addr(struct bl_sockaddr *sa)
{
	sa->addr[0] = 0;
	sa->addr[1] = 0;
	sa->addr[2] = 0;
	sa->addr[3] = 0;
	sa->port = 0;
}

static __always_inline __u32 mix_cookie(__u64 cookie)
{
	__u64 h = cookie * 0x9e3779b97f4a7c15ULL;

	return (__u32)(h >> 32);
}

/*
 * Remember the frontend of a translated socket so replies and getpeername() show it. A connected socket keeps
 * it in its own storage (bl_sks_v1), freed with the socket: no hook runs at close, so a socket the hooks
 * never translated costs one program run in its whole life. A connected UDP socket also gets its cookie
 * here (the pick usually asked for it already), so recvmsg can tell from the cookie alone which UDP sockets
 * may have state. An unconnected socket records each backend it sent to in bl_rev_v1, keyed by its cookie.
 */
static __always_inline void remember_frontend(struct bpf_sock_addr *ctx, const struct bl_sockaddr *front,
					      const struct bl_backend *be, __u32 svc_id, int connected)
{
	struct bl_rev_val rev = { .port = front->port, .svc_id = svc_id };

	copy_addr(rev.addr, front->addr);
	if (connected) {
		struct bl_sock_rev st = { .frontend = rev, .backend_port = be->port };
		struct bl_sock_rev *stored;

		copy_addr(st.backend_addr, be->addr);
		if (ctx->protocol == IPPROTO_UDP)
			bpf_get_socket_cookie(ctx);
		/* created holding st; a socket connected before (UDP may connect again) holds the old pair */
		stored = bpf_sk_storage_get(&bl_sks_v1, ctx->sk, &st, BPF_SK_STORAGE_GET_F_CREATE);
		if (stored)
			*stored = st;
	} else {
		struct bl_rev_key key = { .cookie = bpf_get_socket_cookie(ctx), .port = be->port };
		struct bl_rev_val *old;

		copy_addr(key.addr, be->addr);
		old = bpf_map_lookup_elem(&bl_rev_v1, &key);
		/* one socket sends many datagrams to the same frontend: write only what changed */
		if (!old || old->port != rev.port || old->svc_id != svc_id || old->addr[0] != rev.addr[0] ||
		    old->addr[1] != rev.addr[1] || old->addr[2] != rev.addr[2] || old->addr[3] != rev.addr[3])
			bpf_map_update_elem(&bl_rev_v1, &key, &rev, BPF_ANY);
	}
}

/* The backend this client was last sent to, if it is recent enough and still a valid target. */
static __always_inline __u32 affinity_backend(struct bpf_sock_addr *ctx, const struct bl_svc_val *master,
					      struct bl_aff_key *key, __u64 now)
{
	struct bl_aff_match_key match = { .svc_id = master->svc_id };
	struct bl_aff_val *aff;

	key->netns_cookie = bpf_get_netns_cookie(ctx);
	key->svc_id = master->svc_id;
	aff = bpf_map_lookup_elem(&bl_aff_v1, key);
	if (!aff || now - aff->last_used_ns > (__u64)master->affinity_timeout * 1000000000ULL)
		return 0;
	match.backend_id = aff->backend_id;
	if (!bpf_map_lookup_elem(&bl_affm_v1, &match))
		return 0; /* the backend left the service or is no longer usable */
	aff->last_used_ns = now;
	return aff->backend_id;
}

/* Whether this frontend's primary tier has used up its redirections for the current second. */
static __always_inline int qos_exceeded(__u32 svc_id, __u64 now)
{
	struct bl_qos_val *q = bpf_map_lookup_elem(&bl_qos_v1, &svc_id);

	if (!q)
		return 0;
	if (now - q->window_ns >= 1000000000ULL) {
		q->window_ns = now; /* racy across CPUs by design: at worst a few extra redirections */
		q->count = 0;
	}
	if (q->count >= q->limit)
		return 1;
	__sync_fetch_and_add(&q->count, 1); /* result unused: ISA v1 has no fetch-and-add */
	return 0;
}

/*
 * Pick a backend id from one tier (its master given): an affinity record first, else a slot — random for
 * TCP, by socket cookie for UDP. ``own`` is the client's own backend (loop guard): never returned; the next
 * slot is tried instead. Returns 0 when the tier has nothing for this client.
 */
static __always_inline __u32 pick_backend(struct bpf_sock_addr *ctx, struct bl_svc_key *key,
					  const struct bl_svc_val *master, __u32 own, __u64 now, __u8 *result)
{
	struct bl_aff_key aff_key = {};
	struct bl_svc_val *slot;
	__u32 pick, backend_id = 0;
	int affinity = master->flags & BL_SVC_F_AFFINITY;
	__u16 count = master->count;

	if (count == 0)
		return 0;
	if (affinity) {
		backend_id = affinity_backend(ctx, master, &aff_key, now);
		if (backend_id == own)
			backend_id = 0;
		if (backend_id) {
			*result = BL_RES_AFFINITY;
			return backend_id;
		}
	}
	*result = BL_RES_TRANSLATED;
	if (ctx->protocol == IPPROTO_UDP)
		pick = mix_cookie(bpf_get_socket_cookie(ctx));
	else
		pick = bpf_get_prandom_u32();
	key->slot = (__u16)(pick % count) + 1;
	slot = bpf_map_lookup_elem(&bl_svc_v1, key);
	if (!slot) {
		/*
		 * The writer shrank this tier after ``master`` was read: its new master is in place and the slots
		 * beyond it are going (make-before-break deletes them last). Pick again from the master as it is now.
		 */
		key->slot = BL_MASTER_SLOT;
		master = bpf_map_lookup_elem(&bl_svc_v1, key);
		if (!master || !master->count)
			return 0;
		count = master->count;
		key->slot = (__u16)(pick % count) + 1;
		slot = bpf_map_lookup_elem(&bl_svc_v1, key);
		if (!slot)
			return 0;
	}
	backend_id = slot->backend_id;
	if (own && backend_id == own) {
		if (count == 1)
			return 0;
		*result = BL_RES_LOOP_GUARD_NEXT;
		key->slot = key->slot % count + 1;
		slot = bpf_map_lookup_elem(&bl_svc_v1, key);
		if (!slot)
			return 0;
		backend_id = slot->backend_id;
	}
	if (affinity) {
		struct bl_aff_val aff = { .last_used_ns = now, .backend_id = backend_id };

		bpf_map_update_elem(&bl_aff_v1, &aff_key, &aff, BPF_ANY);
	}
	return backend_id;
}

static __always_inline struct bl_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&bl_cfg_v3, &zero);
}

static __always_inline int in_host_netns(struct bpf_sock_addr *ctx, const struct bl_config *cfg)
{
	return cfg && cfg->host_netns_cookie && bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
}

/* Whether socket LB leaves this client alone: outside the host netns with socketLB.hostNamespaceOnly, or in
 * the cgroup of an excluded pod (bl_skip_v1, consulted only while the agent says it has entries). */
static __always_inline int excluded(struct bpf_sock_addr *ctx, const struct bl_config *cfg)
{
	__u64 cgroup_id;

	if (!cfg || !cfg->flags)
		return 0;
	if ((cfg->flags & BL_CFG_F_HOST_NS_ONLY) && !in_host_netns(ctx, cfg))
		return 1;
	if (!(cfg->flags & BL_CFG_F_SKIP))
		return 0;
	cgroup_id = bpf_get_current_cgroup_id();
	return bpf_map_lookup_elem(&bl_skip_v1, &cgroup_id) != 0;
}

/* What the worker decided, for counters and events. */
struct bl_outcome {
	struct bl_config *cfg; /* the run-time settings, once the address turned out to be a frontend */
	__u32 svc_id;
	__u8  result; /* BL_RES_* */
};

/*
 * The worker: look the address up as a frontend and rewrite it to a backend. A client socket LB leaves alone
 * (excluded()) passes, as does a client outside the host netns for a host-only frontend. Policy frontends may
 * skip their primary tier for this connection (the client is a backend pod with skipRedirectFromBackend, its
 * only backend is the client itself, or the QoS limit is reached) and then use the fallback tier.
 * Returns BL_PASS, BL_XLATED or BL_REFUSE; ``out`` says why.
 */
static __always_inline int translate(struct bpf_sock_addr *ctx, struct bl_sockaddr *sa, int connected,
				     struct bl_outcome *out)
{
	struct bl_svc_key key = { .port = sa->port, .proto = (__u8)ctx->protocol };
	struct bl_svc_val *master, *fallback;
	struct bl_backend *be;
	__u32 own = 0, backend_id = 0;
	__u64 now = 0;
	__u8 why = 0;

	copy_addr(key.addr, sa->addr);
	master = bpf_map_lookup_elem(&bl_svc_v1, &key);
	if (!master)
		return BL_PASS;
	out->cfg = config(); /* not before: connections to anything else never read it */
	if (excluded(ctx, out->cfg))
		return BL_PASS;
	if ((master->flags & BL_SVC_F_HOST_ONLY) && !in_host_netns(ctx, out->cfg))
		return BL_PASS; /* e.g. a pod's own 127.0.0.1:<nodePort> */
	out->svc_id = master->svc_id;
	out->result = BL_RES_REFUSED;
	if (master->flags & (BL_SVC_F_AFFINITY | BL_SVC_F_QOS))
		now = bpf_ktime_get_ns();
	if (master->flags & BL_SVC_F_CLIENTS) {
		struct bl_client_key ck = { .svc_id = out->svc_id, .cgroup_id = bpf_get_current_cgroup_id() };
		struct bl_client_val *client = bpf_map_lookup_elem(&bl_client_v1, &ck);

		if (client) {
			if (client->flags & BL_CLIENT_F_SKIP)
				why = BL_RES_FALLBACK_SKIP;
			else
				own = client->backend_id;
		}
	}
	if (!why && (master->flags & BL_SVC_F_QOS) && qos_exceeded(out->svc_id, now))
		why = BL_RES_FALLBACK_QOS;
	if (!why) {
		backend_id = pick_backend(ctx, &key, master, own, now, &out->result);
		if (!backend_id)
			why = master->count ? BL_RES_FALLBACK_LOOP : BL_RES_FALLBACK_EMPTY;
	}
	if (!backend_id) {
		if (!(master->flags & BL_SVC_F_FALLBACK))
			goto refuse;
		key.scope = BL_SCOPE_FALLBACK;
		key.slot = BL_MASTER_SLOT;
		fallback = bpf_map_lookup_elem(&bl_svc_v1, &key);
		if (!fallback)
			goto refuse;
		backend_id = pick_backend(ctx, &key, fallback, 0, now, &out->result);
		if (!backend_id)
			goto refuse;
		out->result = why;
	}
	be = bpf_map_lookup_elem(&bl_be_v1, &backend_id);
	if (!be) {
		/* the backend went after its slot was read (the writer deletes it last): once more, as it is now */
		key.slot = BL_MASTER_SLOT;
		master = bpf_map_lookup_elem(&bl_svc_v1, &key);
		if (!master)
			goto refuse;
		backend_id = pick_backend(ctx, &key, master, key.scope == BL_SCOPE_FALLBACK ? 0 : own, now,
					  &out->result);
		if (why)
			out->result = why;
		be = backend_id ? bpf_map_lookup_elem(&bl_be_v1, &backend_id) : NULL;
		if (!be)
			goto refuse;
	}

	remember_frontend(ctx, sa, be, out->svc_id, connected);
	copy_addr(sa->addr, be->addr);
	sa->port = be->port;
	return BL_XLATED;
refuse:
	out->result = BL_RES_REFUSED;
	return BL_REFUSE;
}

/* Count the resolution and, when events are on (and sampled in), queue an event for the agent. ``to`` is
 * the backend (all zero when refused). */
static __always_inline void account(struct bpf_sock_addr *ctx, __u8 hook, const struct bl_sockaddr *orig,
				    const struct bl_sockaddr *to, const struct bl_outcome *out)
{
	const struct bl_config *cfg = out->cfg;
	struct bl_event *ev;

	bl_count(out->svc_id, out->result, (__u8)ctx->protocol, hook);
	if (cfg && out->result == BL_RES_REVERSED && !cfg->reverse_events)
		return;
	ev = bl_event_reserve(cfg);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->netns_cookie = bpf_get_netns_cookie(ctx);
	ev->sock_cookie = bpf_get_socket_cookie(ctx);
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->svc_id = out->svc_id;
	copy_addr(ev->orig_addr, orig->addr);
	ev->orig_port = orig->port;
	copy_addr(ev->backend_addr, to->addr);
	ev->backend_port = to->port;
	ev->hook = hook;
	ev->proto = (__u8)ctx->protocol;
	ev->result = out->result;
	ev->pad = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	clear_addr_words(ev->client_addr);
	ev->client_port = 0;
	ev->pad2 = 0;
	ev->ifindex = 0;
	bl_event_submit(ev, cfg);
}

/*
 * Kernel types, only the members read here: libbpf relocates each access against the kernel's BTF. A socket's
 * cookie is 0 until something asks for it; every UDP socket with reverse state was asked (remember_frontend).
 */
typedef struct {
	__s64 counter;
} atomic64_t;

struct sock_common {
	atomic64_t skc_cookie;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

/* what a sock_addr program's context really points to */
struct bpf_sock_addr_kern {
	struct sock *sk;
} __attribute__((preserve_access_index));

/*
 * Whether this socket may have UDP reverse state: only a socket whose cookie was generated can. The cookie is
 * read without generating it (bpf_get_socket_cookie() would allocate one for every socket that never had
 * one) through the context's member sk, read as a number (ctx->sk as the program sees it is a checked
 * pointer: no arithmetic on it). A failed read answers "maybe".
 */
static __always_inline int addr_may_have_state(struct bpf_sock_addr *ctx)
{
	struct bpf_sock_addr_kern *k = 0;
	struct sock *s = 0;
	__u64 sk_off = __builtin_preserve_field_info(k->sk, BPF_FIELD_BYTE_OFFSET);
	__u64 cookie_off = __builtin_preserve_field_info(s->__sk_common.skc_cookie.counter, BPF_FIELD_BYTE_OFFSET);
	__u64 sk, cookie;

	if (bpf_probe_read_kernel(&sk, sizeof(sk), (const char *)ctx + sk_off) || !sk)
		return 1;
	if (bpf_probe_read_kernel(&cookie, sizeof(cookie), (const char *)sk + cookie_off))
		return 1; /* the read failed (and zeroed cookie): maybe */
	return cookie != 0;
}

/*
 * The reverse worker: if the peer is a backend this socket was sent to, show the frontend. ``lookup_udp``
 * (recvmsg): first the backends an unconnected socket sent to, only for a socket with a cookie (every UDP
 * socket with state has one; none is generated here). Then the socket's own storage, which a socket never
 * connected through a frontend does not have (a pointer read, no allocation).
 */
static __always_inline int reverse(struct bpf_sock_addr *ctx, struct bl_sockaddr *sa, int lookup_udp,
				   struct bl_outcome *out)
{
	struct bl_sock_rev *st;

	if (lookup_udp) {
		struct bl_rev_key key = { .port = sa->port };
		struct bl_rev_val *rev;

		if (!addr_may_have_state(ctx))
			return BL_PASS;
		key.cookie = bpf_get_socket_cookie(ctx);
		copy_addr(key.addr, sa->addr);
		rev = bpf_map_lookup_elem(&bl_rev_v1, &key);
		if (rev) {
			copy_addr(sa->addr, rev->addr);
			sa->port = rev->port;
			out->svc_id = rev->svc_id;
			return BL_XLATED;
		}
	}
	st = bpf_sk_storage_get(&bl_sks_v1, ctx->sk, 0, 0);
	if (!st || st->backend_port != sa->port || st->backend_addr[0] != sa->addr[0] ||
	    st->backend_addr[1] != sa->addr[1] || st->backend_addr[2] != sa->addr[2] ||
	    st->backend_addr[3] != sa->addr[3])
		return BL_PASS;
	copy_addr(sa->addr, st->frontend.addr);
	sa->port = st->frontend.port;
	out->svc_id = st->frontend.svc_id;
	return BL_XLATED;
}

static __always_inline int verdict(int res)
{
	if (res == BL_REFUSE) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	return 1;
}

static __always_inline int forward4(struct bpf_sock_addr *ctx, int connected, __u8 hook)
{
	struct bl_sockaddr sa, orig;
	struct bl_outcome out = {};
	int res;

	addr_from_v4(&sa, ctx->user_ip4, ctx->user_port);
	orig = sa;
	res = translate(ctx, &sa, connected, &out);
	if (res == BL_XLATED && !addr_is_v4(sa.addr)) {
		res = BL_REFUSE; /* an IPv6 backend cannot serve an AF_INET socket */
		out.result = BL_RES_REFUSED;
	}
	if (res == BL_XLATED) {
		ctx->user_ip4 = sa.addr[3];
		ctx->user_port = (__u32)sa.port;
	}
	if (res == BL_REFUSE)
		clear_addr(&sa);
	if (res != BL_PASS)
		account(ctx, hook, &orig, &sa, &out);
	return verdict(res);
}

static __always_inline int forward6(struct bpf_sock_addr *ctx, int connected, __u8 hook)
{
	struct bl_sockaddr sa, orig;
	struct bl_outcome out = {};
	int res;

	addr_from_v6(&sa, ctx);
	orig = sa;
	res = translate(ctx, &sa, connected, &out);
	if (res == BL_XLATED)
		addr_to_v6(ctx, &sa);
	if (res == BL_REFUSE)
		clear_addr(&sa);
	if (res != BL_PASS)
		account(ctx, hook, &orig, &sa, &out);
	return verdict(res);
}

static __always_inline int backward4(struct bpf_sock_addr *ctx, int lookup_udp, __u8 hook)
{
	struct bl_sockaddr sa, seen;
	struct bl_outcome out = { .result = BL_RES_REVERSED };

	addr_from_v4(&sa, ctx->user_ip4, ctx->user_port);
	seen = sa;
	if (reverse(ctx, &sa, lookup_udp, &out) == BL_XLATED && addr_is_v4(sa.addr)) {
		ctx->user_ip4 = sa.addr[3];
		ctx->user_port = (__u32)sa.port;
		out.cfg = config();
		account(ctx, hook, &sa, &seen, &out);
	}
	return 1;
}

static __always_inline int backward6(struct bpf_sock_addr *ctx, int lookup_udp, __u8 hook)
{
	struct bl_sockaddr sa, seen;
	struct bl_outcome out = { .result = BL_RES_REVERSED };

	addr_from_v6(&sa, ctx);
	seen = sa;
	if (reverse(ctx, &sa, lookup_udp, &out) == BL_XLATED) {
		addr_to_v6(ctx, &sa);
		out.cfg = config();
		account(ctx, hook, &sa, &seen, &out);
	}
	return 1;
}

SEC("cgroup/connect4")
int bl_connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 1, BL_HOOK_CONNECT4);
}

SEC("cgroup/connect6")
int bl_connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 1, BL_HOOK_CONNECT6);
}

SEC("cgroup/sendmsg4")
int bl_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, 0, BL_HOOK_SENDMSG4);
}

SEC("cgroup/sendmsg6")
int bl_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, 0, BL_HOOK_SENDMSG6);
}

SEC("cgroup/recvmsg4")
int bl_recvmsg4(struct bpf_sock_addr *ctx)
{
	return backward4(ctx, 1, BL_HOOK_RECVMSG4);
}

SEC("cgroup/recvmsg6")
int bl_recvmsg6(struct bpf_sock_addr *ctx)
{
	return backward6(ctx, 1, BL_HOOK_RECVMSG6);
}

SEC("cgroup/getpeername4")
int bl_getpeername4(struct bpf_sock_addr *ctx)
{
	return backward4(ctx, 0, BL_HOOK_GETPEERNAME4);
}

SEC("cgroup/getpeername6")
int bl_getpeername6(struct bpf_sock_addr *ctx)
{
	return backward6(ctx, 0, BL_HOOK_GETPEERNAME6);
}
