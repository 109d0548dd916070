/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The socket iterators' contexts, laid out as the kernel passes them (one 8-byte slot per argument), for the
 * objects that run iter/tcp or iter/udp programs (sockterm.c, sockmigrate.c). No vmlinux.h: the kernel types
 * behind the pointers stay opaque here; each object declares the members it reads with CO-RE relocations.
 */
#ifndef BL_ITER_H
#define BL_ITER_H

struct seq_file;
struct sock_common;
struct udp_sock;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common; /* NULL on the final call */
	__u32 uid;
};

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk; /* NULL on the final call */
	__u32 uid;
	int bucket;
};

#endif /* BL_ITER_H */
