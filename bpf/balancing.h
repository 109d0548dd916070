/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The Balancing BPF ABI: every map, key, value and constant shared by the BPF programs (balancing.c;
 * sockterm.c for socket termination; sockmigrate.c for the upgrade from 0.3) and the control plane.
 * Mirrored by exactly one Python module, src/balancing/datapath/abi.py; tests/unit/test_abi.py checks that
 * mirror against the BTF of the compiled objects (struct sizes and offsets, the enums' values, each object's
 * maps), so an edit on one side only fails a test, not a node.
 *
 * Constants the control plane reads or writes are C enums, not macros, so that they reach the objects' BTF
 * (see bl_btf_anchor at the end). Addresses are always 16 bytes in network order: IPv6 as is, IPv4 as
 * ::ffff:a.b.c.d. One key shape therefore serves connect4, connect6 and v4-mapped IPv6 sockets alike.
 *
 * Map names carry a layout version (_v1, _v2, ...). A layout change bumps it, so an agent never reuses an
 * old pin whose entries it would misread.
 *
 * Each map is declared once, below. An object says which maps it carries by defining one of these before it
 * includes this header: BL_OBJ_DATAPATH (balancing.c), BL_OBJ_NODEPORT (nodeport.c, the north-south TC
 * programs), BL_OBJ_SOCKTERM (sockterm.c) or BL_OBJ_SOCKMIGRATE (sockmigrate.c).
 */
#ifndef BALANCING_H
#define BALANCING_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#if defined(BL_OBJ_DATAPATH) + defined(BL_OBJ_NODEPORT) + defined(BL_OBJ_SOCKTERM) + \
	defined(BL_OBJ_SOCKMIGRATE) != 1
#error "define exactly one of BL_OBJ_DATAPATH, _NODEPORT, _SOCKTERM and _SOCKMIGRATE before balancing.h"
#endif
#if defined(BL_OBJ_DATAPATH) || defined(BL_OBJ_NODEPORT)
#define BL_SHARED_MAPS /* the maps the socket hooks and the north-south programs share */
#endif

#define BL_ABI_VERSION 1

/* Slot 0 of a frontend is its master entry; backend slots are 1..count. */
#define BL_MASTER_SLOT 0

/*
 * struct bl_svc_key.scope: the primary tier, the fallback tier policies fall through to, and the external
 * tier: the backends clients outside the cluster get through this node when they differ from the primary
 * tier's (externalTrafficPolicy Local: this node's endpoints). The north-south programs never read the
 * external tier's slots, they pick from the frontend's Maglev table (bl_mglv_v1), built from those backends;
 * the slots are the writer's record of them.
 */
enum bl_scope {
	BL_SCOPE_PRIMARY  = 0,
	BL_SCOPE_FALLBACK = 1,
	BL_SCOPE_EXTERNAL = 2,
};

/* struct bl_svc_val.flags (master entry) */
enum bl_svc_flags {
	BL_SVC_F_NONE      = 0,
	BL_SVC_F_AFFINITY  = 1 << 0, /* sessionAffinity ClientIP: keep a client on its backend */
	BL_SVC_F_FALLBACK  = 1 << 1, /* a fallback tier exists (scope 1) for connections the primary skips */
	BL_SVC_F_CLIENTS   = 1 << 2, /* look the client's cgroup up in the client map (policy backends) */
	BL_SVC_F_QOS       = 1 << 3, /* primary redirections are rate limited (QoS map) */
	BL_SVC_F_HOST_ONLY = 1 << 4, /* only for clients in the host network namespace (loopback NodePorts) */
	BL_SVC_F_EXTERNAL  = 1 << 5, /* served north-south: packets from outside to this node get a backend */
	BL_SVC_F_ETP_LOCAL = 1 << 6, /* externalTrafficPolicy Local: external clients only get this node's pods */
	BL_SVC_F_SRC_RANGES = 1 << 7, /* loadBalancerSourceRanges: external clients must be in bl_srcr_v1 */
	BL_SVC_F_NODE_ADDRESS = 1 << 8, /* a NodePort: the frontend is this node's address (never a hairpin) */
};

/* Service map: (frontend, slot) -> master entry or backend slot. */
struct bl_svc_key {
	__u32 addr[4];   /* frontend address (IPv6 or v4-mapped IPv4), network order */
	__u16 port;      /* frontend port, network order */
	__u8  proto;     /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8  scope;     /* enum bl_scope */
	__u16 slot;      /* 0: master entry; 1..count: backend slots */
	__u16 pad;       /* 0 */
};

struct bl_svc_val {
	__u32 backend_id; /* slot > 0: key into the backend map; master: 0 */
	__u32 svc_id;     /* frontend identity (stable across restarts; used in events) */
	__u16 count;      /* master: number of backend slots; 0 means refuse */
	__u16 flags;      /* master: enum bl_svc_flags */
	__u32 affinity_timeout; /* master with BL_SVC_F_AFFINITY: idle seconds before a client may move */
};

/* struct bl_backend.flags */
enum bl_backend_flags {
	BL_BE_F_LOCAL = 1 << 0, /* a pod on this node: north-south keeps the client's address (no SNAT) */
};

/* Backend map: backend id -> address. */
struct bl_backend {
	__u32 addr[4];   /* backend address (IPv6 or v4-mapped IPv4), network order */
	__u16 port;      /* backend port, network order */
	__u8  proto;     /* protocol, as in the frontend */
	__u8  flags;     /* enum bl_backend_flags */
	__u32 pad;       /* 0 */
};

/* Reverse map for unconnected UDP: (socket, backend) -> frontend the app asked for. */
struct bl_rev_key {
	__u64 cookie;    /* socket cookie */
	__u32 addr[4];   /* backend address, v4-mapped for IPv4 */
	__u16 port;      /* backend port, network order */
	__u16 pad;       /* 0 */
	__u32 pad2;      /* 0 */
};

struct bl_rev_val {
	__u32 addr[4];   /* frontend address */
	__u16 port;      /* frontend port, network order */
	__u16 pad;       /* 0 */
	__u32 svc_id;    /* frontend identity */
};

/* Reverse state of a connected socket, in the socket's own storage (freed with the socket). */
struct bl_sock_rev {
	struct bl_rev_val frontend; /* what the app connected to */
	__u32 backend_addr[4];      /* where it really goes */
	__u16 backend_port;         /* network order */
	__u16 pad;
	__u32 pad2;
};

/*
 * Session affinity: the client is its network namespace (at connect time the source address is not known
 * yet; every pod has its own namespace, host-network processes share one).
 */
struct bl_aff_key {
	__u64 netns_cookie; /* bpf_get_netns_cookie() of the client */
	__u32 svc_id;       /* frontend identity */
	__u32 pad;          /* 0 */
};

struct bl_aff_val {
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the client's last connect */
	__u32 backend_id;   /* the backend it keeps */
	__u32 pad;          /* 0 */
};

/* (frontend, backend) pairs that are valid affinity targets now; written by the agent. */
struct bl_aff_match_key {
	__u32 svc_id;
	__u32 backend_id;
};

/* A client of a policy frontend that is one of its backend pods, by the cgroup its process runs in. */
struct bl_client_key {
	__u32 svc_id;      /* frontend identity */
	__u32 pad;         /* 0 */
	__u64 cgroup_id;   /* cgroup v2 id (inode) of one of the pod's cgroups */
};

/* struct bl_client_val.flags */
enum bl_client_flags {
	BL_CLIENT_F_SKIP = 1 << 0, /* skipRedirectFromBackend: the primary tier is skipped entirely */
};

struct bl_client_val {
	__u32 backend_id;  /* the pod's own backend: never chosen for its own connections (loop guard) */
	__u32 flags;       /* enum bl_client_flags */
};

/* QoS: primary redirections per second of one frontend on this node (a fixed one-second window). */
struct bl_qos_val {
	__u32 limit;       /* redirections per window; written by the agent */
	__u32 count;       /* redirections in the current window; the datapath counts */
	__u64 window_ns;   /* bpf_ktime_get_ns() at the window start */
};

/* Why a hook did what it did: counters and events carry one of these. */
enum bl_result {
	BL_RES_TRANSLATED      = 1, /* primary tier, a slot */
	BL_RES_AFFINITY        = 2, /* primary tier, the client's affinity record */
	BL_RES_LOOP_GUARD_NEXT = 3, /* primary tier, the slot after the client's own backend */
	BL_RES_FALLBACK_SKIP   = 4, /* fallback tier: the client is a backend pod (skipRedirectFromBackend) */
	BL_RES_FALLBACK_LOOP   = 5, /* fallback tier: the client's own backend is the only one (loop guard) */
	BL_RES_FALLBACK_QOS    = 6, /* fallback tier: the frontend's QoS limit was reached */
	BL_RES_FALLBACK_EMPTY  = 7, /* fallback tier: the primary tier has no backend */
	BL_RES_REFUSED         = 8, /* no usable backend: ECONNREFUSED */
	BL_RES_REVERSED        = 9, /* recvmsg/getpeername showed the frontend instead of the backend */
	/* north-south (TC), counted once per new flow */
	BL_RES_NS_LOCAL        = 10, /* to a pod on this node, the client's address kept */
	BL_RES_NS_SNAT         = 11, /* to a backend elsewhere, the source translated to this node's address */
	BL_RES_DROP_NO_LOCAL   = 12, /* externalTrafficPolicy Local and no endpoint on this node */
	BL_RES_DROP_SOURCE     = 13, /* the client is outside the frontend's loadBalancerSourceRanges */
	BL_RES_DROP_NO_BACKEND = 14, /* no usable backend */
	BL_RES_DROP_SNAT_PORTS = 15, /* no free SNAT port towards that backend */
	BL_RES_DROP_CT_FULL    = 16, /* the connection-tracking map refused the flow */
};

/* Which hook resolved: counters and events carry one of these. */
enum bl_hook {
	BL_HOOK_CONNECT4     = 1,
	BL_HOOK_CONNECT6     = 2,
	BL_HOOK_SENDMSG4     = 3,
	BL_HOOK_SENDMSG6     = 4,
	BL_HOOK_RECVMSG4     = 5,
	BL_HOOK_RECVMSG6     = 6,
	BL_HOOK_GETPEERNAME4 = 7,
	BL_HOOK_GETPEERNAME6 = 8,
	BL_HOOK_TC_INGRESS   = 9,  /* north-south: a packet arriving on a node device */
	BL_HOOK_TC_EGRESS    = 10, /* north-south: a packet leaving a node device */
};

/* Resolution counters (per CPU, summed at scrape time). */
struct bl_stat_key {
	__u32 svc_id;      /* frontend identity */
	__u8  result;      /* enum bl_result */
	__u8  proto;       /* IPPROTO_* */
	__u8  hook;        /* enum bl_hook */
	__u8  pad;         /* 0 */
};

/* struct bl_config.events: which resolutions the datapath puts in the ring buffer. */
enum bl_events_mode {
	BL_EVENTS_OFF     = 0,
	BL_EVENTS_SAMPLED = 1, /* one in bl_config.sample_every */
	BL_EVENTS_ALL     = 2,
};

/*
 * struct bl_config.flags: which clients the socket hooks leave alone. Checked only once the address is a
 * frontend, so connections to anything else pay nothing for them; a client left alone is neither translated
 * nor counted, and no event is emitted (the reverse hooks act only on sockets the forward hooks translated).
 */
enum bl_cfg_flags {
	BL_CFG_F_HOST_NS_ONLY = 1 << 0, /* socketLB.hostNamespaceOnly: only the host netns's sockets (agent config) */
	BL_CFG_F_SKIP         = 1 << 1, /* bl_skip_v1 has entries: look the client's cgroup up (set by the writer) */
};

/* Run-time settings written by the agent (array of one). */
struct bl_config {
	__u32 events;        /* enum bl_events_mode */
	__u32 sample_every;  /* with BL_EVENTS_SAMPLED: one event in this many resolutions */
	__u32 wakeup_bytes;  /* wake the reader only once this much is queued (it also polls on a timer) */
	__u32 reverse_events;/* also emit BL_RES_REVERSED events */
	__u64 host_netns_cookie; /* the host's network namespace (BL_SVC_F_HOST_ONLY, BL_CFG_F_HOST_NS_ONLY) */
	__u32 flags;         /* enum bl_cfg_flags */
	__u32 pad;           /* 0 */
};

/* One resolution, as the ring buffer carries it. */
struct bl_event {
	__u64 ts_ns;          /* bpf_ktime_get_ns() */
	__u64 cgroup_id;      /* the client's cgroup v2 id */
	__u64 netns_cookie;   /* the client's network namespace */
	__u64 sock_cookie;    /* the socket */
	__u32 pid;            /* the client's process (tgid) */
	__u32 svc_id;         /* frontend identity */
	__u32 orig_addr[4];   /* what the application asked for (the frontend) */
	__u32 backend_addr[4];/* where it goes (zero when refused) */
	__u16 orig_port;      /* network order */
	__u16 backend_port;   /* network order */
	__u8  hook;           /* enum bl_hook */
	__u8  proto;          /* IPPROTO_* */
	__u8  result;         /* enum bl_result */
	__u8  pad;
	char  comm[16];       /* the client's command (north-south: empty) */
	__u32 client_addr[4]; /* north-south: the external client's address (socket hooks: zero) */
	__u16 client_port;    /* network order */
	__u16 pad2;
	__u32 ifindex;        /* north-south: the device the packet arrived on */
};

/*
 * Socket termination (bpf/sockterm.c, a separate object loaded only where the kernel has bpf_sock_destroy()):
 * a connected UDP socket keeps the backend connect() gave it, so when that backend leaves the frontend the
 * agent puts the (frontend, backend) pair in the doomed map and runs an iter/udp program in each client
 * network namespace; it destroys the sockets whose reverse state (bl_sock_rev, looked up by socket cookie)
 * names a doomed pair. The frontend is part of the key: a pod behind two Services that leaves one of them
 * keeps the sockets of the other.
 */
struct bl_doom_key {
	__u32 frontend_addr[4]; /* what the socket connected to (bl_sock_rev.frontend.addr), v4-mapped for IPv4 */
	__u32 backend_addr[4];  /* where it went (bl_sock_rev.backend_addr) */
	__u16 frontend_port;    /* network order */
	__u16 backend_port;     /* network order */
	__u8  proto;            /* IPPROTO_UDP: only UDP sockets are terminated */
	__u8  pad;              /* 0 */
	__u16 pad2;             /* 0 */
};

/* One socket an iterator acted on, as it writes it to the iterator's output (read by the agent): destroyed
 * (sockterm.c) or given its 0.3 reverse state (sockmigrate.c). */
struct bl_term_rec {
	__u64 cookie;  /* socket cookie */
	__u32 svc_id;  /* frontend identity (bl_sock_rev.frontend.svc_id) */
	__s32 err;     /* sockterm.c: bpf_sock_destroy(), 0 or -errno; sockmigrate.c: 0 migrated, -EEXIST the
	                * socket's own (newer) state kept, -ENOMEM no storage */
};

/* Indexes in the per-CPU event counters (bl_evstat_v1). */
enum bl_evstat {
	BL_EVSTAT_LOST = 0, /* events dropped: the ring buffer was full */
	BL_EVSTAT_MAX  = 1, /* the number of counters */
};

/*
 * North-south (bpf/nodeport.c, TC on the node's devices). A flow from an external client to a frontend gets
 * two connection-tracking entries, each keyed by a packet as it appears on the wire and saying what to
 * rewrite it to: the client's direction (client -> frontend becomes [node ->] backend) and the reply's
 * (backend -> client or node becomes frontend -> client). Replies of a backend on this node leave through a
 * device (egress); replies to a source-NATed flow come back to the node (ingress).
 */
enum bl_ct_flags {
	BL_CT_F_REPLY = 1 << 0, /* the reply direction's entry */
	BL_CT_F_SNAT  = 1 << 1, /* the source is translated to the node (remote backend) */
	BL_CT_F_LOCAL = 1 << 2, /* the backend is a pod on this node */
};

/* struct bl_ct_val.state: TCP progress as the programs saw it (UDP: NEW until a reply, then ESTABLISHED). */
enum bl_ct_state {
	BL_CT_NEW         = 0, /* only the client has sent */
	BL_CT_ESTABLISHED = 1, /* the backend has answered */
	BL_CT_CLOSING     = 2, /* a FIN or RST was seen */
};

struct bl_ct_key {
	__u32 src[4];    /* v4-mapped for IPv4 */
	__u32 dst[4];
	__u16 sport;     /* network order */
	__u16 dport;     /* network order */
	__u8  proto;
	__u8  pad;
	__u16 pad2;
};

struct bl_ct_val {
	__u32 src[4];       /* the packet's source becomes this */
	__u32 dst[4];       /* its destination becomes this */
	__u16 sport;        /* network order */
	__u16 dport;        /* network order */
	__u32 svc_id;       /* frontend identity */
	__u32 backend_id;   /* the flow keeps this backend while it exists */
	__u8  flags;        /* enum bl_ct_flags */
	__u8  state;        /* enum bl_ct_state (the client direction's entry is the one updated) */
	__u16 pad;
	__u64 created_ns;   /* bpf_ktime_get_ns() at the first packet */
	__u64 seen_ns;      /* bpf_ktime_get_ns() at the last packet (written at most once a second) */
};

/* One node device north-south runs on: the addresses remote backends see as the source (ifindex key). */
struct bl_nsdev {
	__u32 addr4[4];  /* v4-mapped; zero: IPv4 flows through this device are not source-NATed (dropped) */
	__u32 addr6[4];  /* zero: likewise for IPv6 */
};

/* North-south settings (array of one), written by the agent. */
struct bl_ns_config {
	__u32 maglev_size; /* entries of every Maglev table (a prime); 0: north-south translates nothing */
	__u16 snat_min;    /* SNAT source ports, host order, inclusive */
	__u16 snat_max;
	__u32 flags;       /* reserved; 0 */
	__u32 pad;
};

/* loadBalancerSourceRanges: (frontend, client prefix). prefixlen counts svc_id's 32 bits, then the address's
 * 128 (IPv4 prefixes as v4-mapped: 96 + length). */
struct bl_srcr_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u32 addr[4];
};

/* Indexes in the per-CPU north-south fill counters (bl_nsstat_v1). */
enum bl_nsstat {
	BL_NSSTAT_SNAT_ALLOCATED = 0, /* SNAT ports taken (flows started) */
	BL_NSSTAT_SNAT_RETRIES   = 1, /* SNAT candidates found taken */
	BL_NSSTAT_CT_CREATED     = 2, /* flows tracked */
	BL_NSSTAT_BACKEND_GONE   = 3, /* tracked flows whose backend was gone (picked again) */
	BL_NSSTAT_MAX            = 4,
};

_Static_assert(sizeof(struct bl_svc_key) == 24, "bl_svc_key layout");
_Static_assert(sizeof(struct bl_svc_val) == 16, "bl_svc_val layout");
_Static_assert(sizeof(struct bl_backend) == 24, "bl_backend layout");
_Static_assert(sizeof(struct bl_rev_key) == 32, "bl_rev_key layout");
_Static_assert(sizeof(struct bl_rev_val) == 24, "bl_rev_val layout");
_Static_assert(sizeof(struct bl_sock_rev) == 48, "bl_sock_rev layout");
_Static_assert(sizeof(struct bl_aff_key) == 16, "bl_aff_key layout");
_Static_assert(sizeof(struct bl_aff_val) == 16, "bl_aff_val layout");
_Static_assert(sizeof(struct bl_aff_match_key) == 8, "bl_aff_match_key layout");
_Static_assert(sizeof(struct bl_client_key) == 16, "bl_client_key layout");
_Static_assert(sizeof(struct bl_client_val) == 8, "bl_client_val layout");
_Static_assert(sizeof(struct bl_qos_val) == 16, "bl_qos_val layout");
_Static_assert(sizeof(struct bl_stat_key) == 8, "bl_stat_key layout");
_Static_assert(sizeof(struct bl_config) == 32, "bl_config layout");
_Static_assert(sizeof(struct bl_event) == 120, "bl_event layout");
_Static_assert(sizeof(struct bl_ct_key) == 40, "bl_ct_key layout");
_Static_assert(sizeof(struct bl_ct_val) == 64, "bl_ct_val layout");
_Static_assert(sizeof(struct bl_nsdev) == 32, "bl_nsdev layout");
_Static_assert(sizeof(struct bl_ns_config) == 16, "bl_ns_config layout");
_Static_assert(sizeof(struct bl_srcr_key) == 24, "bl_srcr_key layout");
_Static_assert(sizeof(struct bl_doom_key) == 40, "bl_doom_key layout");
_Static_assert(sizeof(struct bl_term_rec) == 16, "bl_term_rec layout");

/* Default capacities; the loader overrides them from flags before load. */
#define BL_DEFAULT_SVC_ENTRIES   (65536 + 1048576)  /* frontends + backend slots */
#define BL_DEFAULT_BACKENDS      262144
#define BL_DEFAULT_REV_ENTRIES   131072
#define BL_DEFAULT_AFF_ENTRIES   65536              /* (client, frontend) affinity records */
#define BL_DEFAULT_CLIENT_ENTRIES 65536             /* (policy frontend, backend pod cgroup) rules */
#define BL_DEFAULT_QOS_ENTRIES   4096               /* rate-limited policy frontends */
#define BL_DEFAULT_STAT_ENTRIES  262144             /* (frontend, result, proto, hook) counters */
#define BL_DEFAULT_EVENT_BYTES   (4 << 20)          /* ring buffer */
#define BL_DEFAULT_DOOM_ENTRIES  65536              /* doomed (frontend, backend) pairs per iterator run */
#define BL_DEFAULT_SKIP_ENTRIES  16384              /* cgroups of this node's pods excluded from socket LB */
#define BL_DEFAULT_MAGLEV_ENTRIES 65536             /* frontends served north-south (one table each) */
#define BL_DEFAULT_MAGLEV_SIZE   16381              /* entries of one Maglev table: a prime >= 100 x backends */
#define BL_DEFAULT_SRCR_ENTRIES  16384              /* (frontend, source range) pairs */
#define BL_DEFAULT_CT_ENTRIES    262144             /* north-south flows x 2 directions */
#define BL_DEFAULT_NSDEV_ENTRIES 64                 /* node devices north-south runs on */
#define BL_LEGACY_SOCK_ENTRIES   262144             /* 0.3's bl_sock_v2 (its --max-sockets; the pin's wins) */

/*
 * The maps, pinned under <bpffs>/maps/<name>. The datapath object (BL_OBJ_DATAPATH) carries the socket
 * hooks' maps and the shared ones; the north-south object (BL_OBJ_NODEPORT) the shared ones, which its loader
 * points at the datapath's pins, and its own (connection tracking, devices, settings); the
 * socket-termination object (BL_OBJ_SOCKTERM) carries bl_sks_v1, pointed at the datapath's pin, and
 * bl_doom_v1, its own and never pinned; the upgrade's migration object (BL_OBJ_SOCKMIGRATE) carries
 * bl_sks_v1 and 0.3's bl_sock_v2, both pointed at their pins (the datapath no longer declares bl_sock_v2:
 * its pin is retired once the migration ran).
 */

#if defined(BL_OBJ_DATAPATH) || defined(BL_OBJ_SOCKTERM) || defined(BL_OBJ_SOCKMIGRATE)
/* Connected sockets: socket storage -> what the app connected to and where it really goes. Written by
 * connect4/6 (and, once on the upgrade from 0.3, by the migration iterators), read by recvmsg/getpeername
 * and the termination iterator; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct bl_sock_rev);
} bl_sks_v1 SEC(".maps");
#endif

#ifdef BL_SHARED_MAPS
/* Frontends: (frontend, scope, slot) -> a tier's master entry (slot 0) or one of its backend slots. Written
 * by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_SVC_ENTRIES);
	__type(key, struct bl_svc_key);
	__type(value, struct bl_svc_val);
} bl_svc_v1 SEC(".maps");

/* Backends: backend id -> address. Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_BACKENDS);
	__type(key, __u32);
	__type(value, struct bl_backend);
} bl_be_v1 SEC(".maps");

/* Resolution counters: (frontend, result, protocol, hook) -> count, per CPU. Read by the agent's metrics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_STAT_ENTRIES);
	__type(key, struct bl_stat_key);
	__type(value, __u64);
} bl_stats_v1 SEC(".maps");

/* Run-time settings (index 0): events, sampling, wakeup threshold, the host's netns, which clients are left
 * alone. Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bl_config);
} bl_cfg_v3 SEC(".maps");

/* Resolution events (struct bl_event), read by the agent's event pipeline. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, BL_DEFAULT_EVENT_BYTES);
} bl_events_v2 SEC(".maps");

/* Event counters (enum bl_evstat) -> count, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BL_EVSTAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bl_evstat_v1 SEC(".maps");

/* Maglev tables of the frontends served north-south: svc_id -> an array of maglev_size backend ids (struct
 * bl_ns_config), two per element, built by the agent from the external backends and swapped whole (a new
 * inner map named bl_mglv_<size>, then one update of this entry), so a packet never sees a half-written
 * table; never changed once made, so frontends with the same backends share one. Written by the agent. */
struct bl_maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP); /* tables of any size may be inserted */
	__uint(max_entries, (BL_DEFAULT_MAGLEV_SIZE + 1) / 2);
	__type(key, __u32);
	__type(value, __u64); /* entries 2k and 2k + 1 (an array rounds values up to 8 bytes: pairs halve it) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_MAGLEV_ENTRIES);
	__type(key, __u32);
	__array(values, struct bl_maglev_table);
} bl_mglv_v1 SEC(".maps");

/* loadBalancerSourceRanges of the frontends with BL_SVC_F_SRC_RANGES: (svc_id, client prefix) -> 1
 * (unused). Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_SRCR_ENTRIES);
	__type(key, struct bl_srcr_key);
	__type(value, __u32);
} bl_srcr_v1 SEC(".maps");
#endif /* BL_SHARED_MAPS */

#ifdef BL_OBJ_DATAPATH
/* Unconnected UDP: (socket, backend) -> the frontend a datagram was sent to, for recvmsg. Written by
 * sendmsg4/6 (only when it changes); never deleted: an LRU, the least recently used make room. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BL_DEFAULT_REV_ENTRIES);
	__type(key, struct bl_rev_key);
	__type(value, struct bl_rev_val);
} bl_rev_v1 SEC(".maps");

/* Session affinity: (client netns, frontend) -> the backend it keeps and when it last used it. Written by
 * the forward hooks. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BL_DEFAULT_AFF_ENTRIES);
	__type(key, struct bl_aff_key);
	__type(value, struct bl_aff_val);
} bl_aff_v1 SEC(".maps");

/* (frontend, backend) pairs that are valid affinity targets now (value unused). Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_BACKENDS);
	__type(key, struct bl_aff_match_key);
	__type(value, __u32);
} bl_affm_v1 SEC(".maps");

/* Policy frontends: (frontend, cgroup of a backend pod) -> that pod's rule. Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_CLIENT_ENTRIES);
	__type(key, struct bl_client_key);
	__type(value, struct bl_client_val);
} bl_client_v1 SEC(".maps");

/* QoS: frontend identity -> its redirection limit (the agent) and current window (the datapath). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BL_DEFAULT_QOS_ENTRIES);
	__type(key, __u32);
	__type(value, struct bl_qos_val);
} bl_qos_v1 SEC(".maps");

/* Clients excluded from socket LB (pods annotated, or in a namespace labelled, balancing.elf.io/socket-lb:
 * disabled): cgroup v2 id of one of the pod's cgroups -> 1 (unused). Looked up only while BL_CFG_F_SKIP is
 * set. Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_SKIP_ENTRIES);
	__type(key, __u64);
	__type(value, __u32);
} bl_skip_v1 SEC(".maps");
#endif /* BL_OBJ_DATAPATH */

#ifdef BL_OBJ_NODEPORT
/* North-south connection tracking: a packet as it appears (struct bl_ct_key) -> what to rewrite it to. Both
 * directions of a flow; the least recently used make room. Written by the TC programs. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BL_DEFAULT_CT_ENTRIES);
	__type(key, struct bl_ct_key);
	__type(value, struct bl_ct_val);
} bl_ct_v1 SEC(".maps");

/* The node devices north-south runs on: ifindex -> their SNAT addresses. Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BL_DEFAULT_NSDEV_ENTRIES);
	__type(key, __u32);
	__type(value, struct bl_nsdev);
} bl_nsdev_v1 SEC(".maps");

/* North-south settings (index 0). Written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bl_ns_config);
} bl_nscfg_v1 SEC(".maps");

/* North-south counters (enum bl_nsstat) -> count, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BL_NSSTAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bl_nsstat_v1 SEC(".maps");
#endif /* BL_OBJ_NODEPORT */

#ifdef BL_OBJ_SOCKTERM
/* (frontend, backend) pairs whose connected UDP sockets are to be destroyed (value unused). Filled by the
 * agent around one iterator run and emptied after it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, BL_DEFAULT_DOOM_ENTRIES);
	__type(key, struct bl_doom_key);
	__type(value, __u32);
} bl_doom_v1 SEC(".maps");
#endif /* BL_OBJ_SOCKTERM */

#ifdef BL_OBJ_SOCKMIGRATE
/* Up to 0.3, connected sockets: socket cookie -> struct bl_sock_rev, deleted by 0.3's cgroup/sock_release.
 * Declared as 0.3 created it, only to reuse its pin: read by the migration iterators, never written. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BL_LEGACY_SOCK_ENTRIES);
	__type(key, __u64);
	__type(value, struct bl_sock_rev);
} bl_sock_v2 SEC(".maps");
#endif /* BL_OBJ_SOCKMIGRATE */

/*
 * BTF anchor. BTF describes only the types that something emitted refers to: the enums above are only ever
 * values, the ring-buffer event and the iterator's output record only ever locals. This function, never
 * called (libbpf loads no uncalled function), names them all, so that each object's BTF carries them for
 * bpftool and for the ABI test.
 */
struct bl_btf_anchor {
	enum bl_scope scope;
	enum bl_svc_flags svc_flags;
	enum bl_client_flags client_flags;
	enum bl_result result;
	enum bl_hook hook;
	enum bl_events_mode events;
	enum bl_cfg_flags cfg_flags;
	enum bl_evstat evstat;
	enum bl_backend_flags backend_flags;
	enum bl_ct_flags ct_flags;
	enum bl_ct_state ct_state;
	enum bl_nsstat nsstat;
	struct bl_event event;        /* by value: behind a pointer BTF would only forward-declare it */
	struct bl_term_rec term_rec;
	struct bl_ns_config ns_config;
	struct bl_nsdev nsdev;
};

__attribute__((used)) static __noinline int bl_btf_anchor(const struct bl_btf_anchor *types)
{
	return types != 0;
}

#endif /* BALANCING_H */
