/* Datagram probe for bench/hooks.py: `server PORT` echoes every datagram back to its sender forever;
 * `client IP PORT N WINDOW` sends N datagrams from one unconnected socket (sendto), WINDOW at a time, and
 * reads each window's echoes back (recvfrom), so every datagram runs the client's sendmsg and recvmsg hooks
 * once. Prints "ns_per_datagram cpu_ns_per_datagram lost wrong_source" (cpu: this process's CPU time,
 * whoever else runs): an echo not back within 200 ms is lost (the rest of its
 * window is dropped), and an echo whose source is not IP:PORT means the reply was not shown as the address
 * sent to (the reverse translation failed). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int server(int port)
{
	struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any };
	int fd = socket(AF_INET6, SOCK_DGRAM, 0);
	char buf[2048];

	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		perror("server");
		return 1;
	}
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		struct sockaddr_storage from;
		socklen_t len = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len);

		if (n >= 0)
			sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
	}
}

static int client(const char *ip, int port, long n, int window)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct timeval tmo = { .tv_sec = 0, .tv_usec = 200000 };
	long lost = 0, wrong = 0, seq = 0;
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	double start, cpu_start;

	if (inet_pton(AF_INET, ip, &to.sin_addr) != 1 || window < 1) {
		fprintf(stderr, "bad address %s or window %d\n", ip, window);
		return 2;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
	start = now_ns();
	cpu_start = cpu_ns();
	while (seq < n) {
		int burst = n - seq < window ? (int)(n - seq) : window;

		for (int i = 0; i < burst; i++, seq++)
			if (sendto(fd, &seq, sizeof(seq), 0, (struct sockaddr *)&to, sizeof(to)) != sizeof(seq))
				lost++;
		for (int i = 0; i < burst; i++) {
			struct sockaddr_in from;
			socklen_t len = sizeof(from);
			long got;

			if (recvfrom(fd, &got, sizeof(got), 0, (struct sockaddr *)&from, &len) < 0) {
				if (errno != EAGAIN && errno != EWOULDBLOCK)
					perror("recvfrom");
				lost += burst - i;
				break;
			}
			if (from.sin_addr.s_addr != to.sin_addr.s_addr || from.sin_port != to.sin_port)
				wrong++;
		}
	}
	printf("%.1f %.1f %ld %ld\n", (now_ns() - start) / n, (cpu_ns() - cpu_start) / n, lost, wrong);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc == 6 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: %s server PORT | client IP PORT N WINDOW\n", argv[0]);
	return 2;
}
