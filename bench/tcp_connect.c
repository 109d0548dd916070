/* Connect-rate probe for bench/run.py and bench/hooks.py: `server PORT` accepts and closes forever;
 * `client IP PORT N` makes N sequential connect+close rounds and prints "rate_per_s p50_us p99_us errors
 * cpu_ns_per_connect" (the last: this process's CPU time over the rounds, whoever else runs). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static double cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int server(int port)
{
	struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any };
	int one = 1, fd = socket(AF_INET6, SOCK_STREAM, 0);

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 4096)) {
		perror("server");
		return 1;
	}
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		int c = accept(fd, NULL, NULL);

		if (c >= 0)
			close(c);
	}
}

static int client(const char *ip, int port, int n)
{
	struct sockaddr_storage ss = { 0 };
	socklen_t len;
	double *lat = calloc(n, sizeof(double)), start, cpu_start;
	int errors = 0, ok = 0, family;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 }; /* RST on close: no TIME_WAIT pile-up */

	if (strchr(ip, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;

		s6->sin6_family = family = AF_INET6;
		s6->sin6_port = htons(port);
		inet_pton(AF_INET6, ip, &s6->sin6_addr);
		len = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;

		s4->sin_family = family = AF_INET;
		s4->sin_port = htons(port);
		inet_pton(AF_INET, ip, &s4->sin_addr);
		len = sizeof(*s4);
	}
	start = now_us();
	cpu_start = cpu_ns();
	for (int i = 0; i < n; i++) {
		int fd = socket(family, SOCK_STREAM, 0);
		double t0 = now_us();

		if (connect(fd, (struct sockaddr *)&ss, len) == 0)
			lat[ok++] = now_us() - t0;
		else
			errors++;
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(fd);
	}
	double total = now_us() - start, cpu = cpu_ns() - cpu_start;

	qsort(lat, ok, sizeof(double), cmp);
	printf("%.1f %.2f %.2f %d %.1f\n", n / (total / 1e6), ok ? lat[ok / 2] : 0.0,
	       ok ? lat[ok * 99 / 100] : 0.0, errors, cpu / n);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "server"))
		return server(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "client"))
		return client(argv[2], atoi(argv[3]), atoi(argv[4]));
	fprintf(stderr, "usage: %s server PORT | client IP PORT N\n", argv[0]);
	return 2;
}
