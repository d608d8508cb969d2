/*
 * Connection churn on loopback for scripts/bench-probe.sh: short TCP connections with a small
 * payload, as fast as the machine allows, for a fixed time.
 *
 *   churn SECONDS CLIENT_THREADS
 *
 * One accept loop per client thread (SO_REUSEPORT listeners on 127.0.0.1:PORT); each client
 * thread connects, sends 64 bytes, reads 64 bytes back and closes, in a loop. Prints
 * "connections=N seconds=S rate=R" where N counts completed request/response exchanges.
 * Run it in its own network namespace with net.ipv4.tcp_tw_reuse=1 so TIME_WAIT sockets do
 * not exhaust the ephemeral ports (the script does).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64

static atomic_int stop;
static atomic_ulong done;
static int port;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int full_io(int fd, char *buf, int n, int writing) {
    int got = 0;
    while (got < n) {
        ssize_t r = writing ? write(fd, buf + got, n - got) : read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

static int listener(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096)) {
        perror("bind/listen");
        exit(1);
    }
    return fd;
}

static void *server(void *arg) {
    int lfd = (int)(long)arg;
    char buf[PAYLOAD];
    while (!atomic_load(&stop)) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) continue;
        if (full_io(c, buf, PAYLOAD, 0) == 0) full_io(c, buf, PAYLOAD, 1);
        close(c);
    }
    return NULL;
}

static void *client(void *arg) {
    (void)arg;
    char buf[PAYLOAD];
    memset(buf, 'x', sizeof buf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    while (!atomic_load(&stop)) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
            full_io(fd, buf, PAYLOAD, 1) == 0 && full_io(fd, buf, PAYLOAD, 0) == 0)
            atomic_fetch_add(&done, 1);
        close(fd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: churn SECONDS CLIENT_THREADS\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    int threads = atoi(argv[2]);
    /* Below the namespace's ephemeral range (the script sets 32768-65000). */
    port = 10000 + getpid() % 20000;
    pthread_t t[64];
    int n = 0;
    for (int i = 0; i < threads && n < 62; i++) {
        pthread_create(&t[n++], NULL, server, (void *)(long)listener());
    }
    double start = now();
    for (int i = 0; i < threads && n < 64; i++) pthread_create(&t[n++], NULL, client, NULL);
    while (now() - start < seconds) usleep(10000);
    atomic_store(&stop, 1);
    double elapsed = now() - start;
    unsigned long total = atomic_load(&done);
    printf("connections=%lu seconds=%.3f rate=%.0f\n", total, elapsed, total / elapsed);
    fflush(stdout);
    /* Server threads may sit in accept(); exit without joining. */
    _exit(0);
}
