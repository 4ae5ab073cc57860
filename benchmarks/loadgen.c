// Loopback TCP load for the collector benchmark (benchmarks/bench_collector.py builds it with cc).
//
//   loadgen bulk SECONDS    one connection, 64 KiB send()s for SECONDS; prints bytes/s
//   loadgen churn SECONDS   connect, 100-byte request, 100-byte reply, close, one after the
//                           other for SECONDS; prints connections/s
//
// Client and server are two processes (the server is forked), so neither a GIL nor an
// interpreter sits between the kernel and the load: what the kernel does per byte or per
// connection, BPF programs included, is what limits the rate. The caller pins the process (and
// so its child) to one CPU. Printed: the rate, the CPU seconds the two processes used while the
// load ran (CLOCK_PROCESS_CPUTIME_ID, the scheduler's own account: not sampled by ticks, and
// not counting time another process had the CPU), which is where the tracepoints' programs run
// too, and the seconds it ran.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define RECV_BUF (1024 * 1024)
#define MESSAGE 100

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

// The server's CPU time goes back to the client through this pipe when it stops.
static int report[2];
static volatile sig_atomic_t stopping;

static void on_term(int sig) {
    (void)sig;
    stopping = 1;
}

static void server_exit(double cpu_start) {
    double used = cpu_now() - cpu_start;
    if (write(report[1], &used, sizeof(used)) != sizeof(used))
        _exit(1);
    _exit(0);
}

static int listener(struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(addr, 0, sizeof(*addr));
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(*addr);
    if (bind(fd, (struct sockaddr *)addr, len) < 0 || listen(fd, 4096) < 0 ||
        getsockname(fd, (struct sockaddr *)addr, &len) < 0)
        die("listen");
    return fd;
}

static int dial(const struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
        die("connect");
    return fd;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void bulk_server(int lfd) {
    static char buf[RECV_BUF];
    double start = cpu_now();
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    while (recv(fd, buf, sizeof(buf), 0) > 0)
        ;
    server_exit(start);
}

static void churn_server(int lfd) {
    char buf[MESSAGE], reply[MESSAGE];
    memset(reply, 'r', sizeof(reply));
    // SIGTERM interrupts accept() (no SA_RESTART): the client is done.
    struct sigaction term = {.sa_handler = on_term};
    sigaction(SIGTERM, &term, NULL);
    double start = cpu_now();
    while (!stopping) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        size_t got = 0;
        while (got < MESSAGE) {
            ssize_t n = recv(fd, buf, sizeof(buf) - got, 0);
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        write_all(fd, reply, sizeof(reply));
        close(fd);
    }
    server_exit(start);
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "bulk") && strcmp(argv[1], "churn"))) {
        fprintf(stderr, "usage: %s bulk|churn SECONDS\n", argv[0]);
        return 2;
    }
    int bulk = strcmp(argv[1], "bulk") == 0;
    double seconds = atof(argv[2]);
    struct sockaddr_in addr;
    int lfd = listener(&addr);
    if (pipe(report) < 0)
        die("pipe");
    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0) {
        if (bulk)
            bulk_server(lfd);
        churn_server(lfd);
    }
    close(lfd);

    double count = 0, start, elapsed, cpu_start = cpu_now(), cpu;
    if (bulk) {
        static char chunk[CHUNK];
        memset(chunk, 'x', sizeof(chunk));
        int fd = dial(&addr);
        start = now();
        double end = start + seconds;
        while (now() < end) {
            if (write_all(fd, chunk, sizeof(chunk)) < 0)
                die("send");
            count += sizeof(chunk);
        }
        elapsed = now() - start;
        cpu = cpu_now() - cpu_start;
        close(fd);  // the server sees the end of the stream and exits
    } else {
        char request[MESSAGE], buf[MESSAGE];
        memset(request, 'q', sizeof(request));
        start = now();
        double end = start + seconds;
        while (now() < end) {
            int fd = dial(&addr);
            if (write_all(fd, request, sizeof(request)) < 0)
                die("send");
            ssize_t n;
            while ((n = recv(fd, buf, sizeof(buf), 0)) > 0)
                ;
            if (n < 0)
                die("recv");
            close(fd);
            count++;
        }
        elapsed = now() - start;
        cpu = cpu_now() - cpu_start;
        kill(server, SIGTERM);
    }
    double server_cpu;
    if (read(report[0], &server_cpu, sizeof(server_cpu)) != sizeof(server_cpu))
        die("server report");
    int status;
    if (waitpid(server, &status, 0) < 0)
        die("waitpid");
    cpu += server_cpu;
    printf("%.1f %.6f %.6f\n", count / elapsed, cpu, elapsed);
    return 0;
}
