/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Counting and events, shared by the socket hooks (balancing.c) and the north-south programs (nodeport.c):
 * both count every resolution in bl_stats_v1 and, when the agent turned events on (bl_cfg_v3), put a struct
 * bl_event in bl_events_v2. Include after balancing.h, in an object that carries the shared maps.
 */
#ifndef BL_ACCOUNTING_H
#define BL_ACCOUNTING_H

#ifndef BL_SHARED_MAPS
#error "accounting.h needs the shared maps (include balancing.h with BL_OBJ_DATAPATH or BL_OBJ_NODEPORT)"
#endif

/* One resolution more for (frontend, result, protocol, hook), per CPU (summed at scrape time). */
static __always_inline void bl_count(__u32 svc_id, __u8 result, __u8 proto, __u8 hook)
{
	struct bl_stat_key sk = { .svc_id = svc_id, .result = result, .proto = proto, .hook = hook };
	__u64 *count = bpf_map_lookup_elem(&bl_stats_v1, &sk);

	if (count) {
		*count += 1; /* per CPU: no atomics needed */
	} else {
		__u64 one = 1;

		bpf_map_update_elem(&bl_stats_v1, &sk, &one, BPF_NOEXIST);
	}
}

/* A ring-buffer slot for this resolution's event, or NULL: events off, not sampled in, or the ring full
 * (counted as lost). */
static __always_inline struct bl_event *bl_event_reserve(const struct bl_config *cfg)
{
	struct bl_event *ev;
	__u32 zero = 0;

	if (!cfg || cfg->events == BL_EVENTS_OFF)
		return NULL;
	if (cfg->events == BL_EVENTS_SAMPLED && cfg->sample_every > 1 && bpf_get_prandom_u32() % cfg->sample_every)
		return NULL;
	ev = bpf_ringbuf_reserve(&bl_events_v2, sizeof(*ev), 0);
	if (!ev) {
		__u64 *lost = bpf_map_lookup_elem(&bl_evstat_v1, &zero);

		if (lost)
			*lost += 1;
	}
	return ev;
}

/* Hand the event to the agent, waking its reader only once wakeup_bytes are queued (it also polls). */
static __always_inline void bl_event_submit(struct bl_event *ev, const struct bl_config *cfg)
{
	bpf_ringbuf_submit(ev, bpf_ringbuf_query(&bl_events_v2, BPF_RB_AVAIL_DATA) >= cfg->wakeup_bytes ?
				       BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

#endif /* BL_ACCOUNTING_H */
