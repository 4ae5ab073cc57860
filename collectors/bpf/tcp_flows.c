// TCP connection lifecycle, in the manner of BCC's tcplife: one event per connection when it
// closes, with counters read from the socket, plus in-kernel snapshots of live connections.
//
// Struct layouts of this kernel differ from the headers BCC compiles against, so every field
// of struct sock / tcp_sock / net is read at a byte offset taken from the running kernel's BTF
// and passed in as a -D macro (see collectors/btf.py): TCP_BYTES_ACKED, TCP_BYTES_RECEIVED,
// TCP_SEGS_IN, TCP_SEGS_OUT, TCP_SRTT_US, SKC_NET, NET_NS_INUM. Also -D MAX_CONNS, SNAPSHOT_NS.

#include <uapi/linux/ptrace.h>

// include/net/tcp_states.h; spelled out so nothing here depends on the stand-in headers.
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_FIN_WAIT1 4
#define ST_FIN_WAIT2 5
#define ST_CLOSE 7
#define ST_CLOSE_WAIT 8
#define ST_LAST_ACK 9
#define ST_CLOSING 11
#define PROTO_TCP 6
#define FAMILY_INET6 10

struct conn_t {
    u64 start_ns;
    u64 snapshot_ns;     // when the counters below were last read from the socket
    u64 bytes_acked;     // bytes this socket sent that the peer acknowledged
    u64 bytes_received;
    u64 segs_in;
    u64 segs_out;
    u64 cgroup_id;
    u32 srtt_us;
    u32 pid;             // 0 until known: an accepted socket is born in softirq context
    u32 netns;
    u8 active;           // 1: this socket connect()ed; 0: it was accept()ed
    u8 reset;
    u8 established;      // addresses below are set once the connection is established
    // The kernel's byte counters include one for each SYN and FIN in sequence space; these
    // say which FINs were exchanged, so user space can report payload bytes exactly.
    u8 fin_in;           // the peer's FIN arrived
    u8 fin_out_acked;    // our FIN was acknowledged
    char comm[16];
    u8 saddr[16];        // local address (IPv4 in the first 4 bytes)
    u8 daddr[16];        // remote address
    u16 sport;           // local port
    u16 dport;           // remote port
    u16 family;
};

struct event_t {
    struct conn_t conn;
    u64 end_ns;
    u32 oldstate;
};

BPF_HASH(live, u64, struct conn_t, MAX_CONNS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
// Loss is counted, never silent: [0] ring buffer full, [1] live map full.
BPF_PERCPU_ARRAY(lost, u64, 2);

static __always_inline void count_lost(int which) {
    u64 *n = lost.lookup(&which);
    if (n)
        (*n)++;
}

static __always_inline void read_counters(void *sk, struct conn_t *c) {
    u32 srtt = 0;
    bpf_probe_read_kernel(&c->bytes_acked, 8, sk + TCP_BYTES_ACKED);
    bpf_probe_read_kernel(&c->bytes_received, 8, sk + TCP_BYTES_RECEIVED);
    u32 segs = 0;
    bpf_probe_read_kernel(&segs, 4, sk + TCP_SEGS_IN);
    c->segs_in = segs;
    bpf_probe_read_kernel(&segs, 4, sk + TCP_SEGS_OUT);
    c->segs_out = segs;
    bpf_probe_read_kernel(&srtt, 4, sk + TCP_SRTT_US);
    c->srtt_us = srtt >> 3;  // the kernel keeps srtt_us in units of 1/8 microsecond
}

static __always_inline u32 read_netns(void *sk) {
    void *net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), sk + SKC_NET);
    if (net)
        bpf_probe_read_kernel(&inum, 4, net + NET_NS_INUM);
    return inum;
}

// The tracepoint's own copy of the addresses, in host byte order for the ports.
#define STORE_ADDRS(c, args)                                                   \
    do {                                                                       \
        (c)->family = (args)->family;                                          \
        (c)->sport = (args)->sport;                                            \
        (c)->dport = (args)->dport;                                            \
        if ((args)->family == FAMILY_INET6) {                                  \
            bpf_probe_read_kernel((c)->saddr, 16, (args)->saddr_v6);           \
            bpf_probe_read_kernel((c)->daddr, 16, (args)->daddr_v6);           \
        } else {                                                               \
            __builtin_memset((c)->saddr, 0, 16);                               \
            __builtin_memset((c)->daddr, 0, 16);                               \
            bpf_probe_read_kernel((c)->saddr, 4, (args)->saddr);               \
            bpf_probe_read_kernel((c)->daddr, 4, (args)->daddr);               \
        }                                                                      \
    } while (0)

static __always_inline void read_task(struct conn_t *c) {
    c->pid = bpf_get_current_pid_tgid() >> 32;
    c->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int state = args->newstate;

    if (state == ST_SYN_SENT || state == ST_SYN_RECV) {
        struct conn_t c = {};
        c.start_ns = bpf_ktime_get_ns();
        c.active = state == ST_SYN_SENT;
        if (c.active)
            read_task(&c);  // connect() runs in the caller's context
        c.netns = read_netns((void *)sk);
        if (live.insert(&sk, &c) != 0 && !live.lookup(&sk))
            count_lost(1);
        return 0;
    }
    struct conn_t *c = live.lookup(&sk);
    if (!c)
        return 0;  // opened before the collector attached
    if (state == ST_ESTABLISHED) {
        STORE_ADDRS(c, args);
        c->established = 1;
        return 0;
    }
    if (state == ST_CLOSE_WAIT || state == ST_CLOSING)
        c->fin_in = 1;
    if (state == ST_FIN_WAIT2)
        c->fin_out_acked = 1;
    if (state != ST_CLOSE)
        return 0;

    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        count_lost(0);
        live.delete(&sk);
        return 0;
    }
    e->conn = *c;
    read_counters((void *)sk, &e->conn);
    e->end_ns = bpf_ktime_get_ns();
    int old = args->oldstate;
    // Closing straight from these states means the connection was aborted, not shut down.
    if (old == ST_ESTABLISHED || old == ST_SYN_SENT || old == ST_SYN_RECV ||
        old == ST_CLOSE_WAIT || old == ST_FIN_WAIT1)
        e->conn.reset = 1;
    if (!e->conn.reset) {
        // FIN_WAIT2 -> CLOSE is the move to TIME_WAIT on the peer's FIN (or, rarely, the
        // FIN_WAIT2 timeout of an orphan, which this cannot tell apart); CLOSING and LAST_ACK
        // close when our FIN is acknowledged.
        if (old == ST_FIN_WAIT2)
            e->conn.fin_in = 1;
        if (old == ST_CLOSING || old == ST_LAST_ACK)
            e->conn.fin_out_acked = 1;
    }
    e->oldstate = old;
    STORE_ADDRS(&e->conn, args);
    // No wakeup per event: user space drains the buffer in batches (a wakeup per closed
    // connection would cost more than the event itself).
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    live.delete(&sk);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 sk = (u64)args->skaddr;
    struct conn_t *c = live.lookup(&sk);
    if (c)
        c->reset = 1;
    return 0;
}

// Every send and receive on a tracked socket: learn the owner of an accepted socket, and
// refresh the counters of a long-lived connection at most once per SNAPSHOT_NS.
static __always_inline int on_io(void *skaddr, u16 protocol) {
    if (protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)skaddr;
    struct conn_t *c = live.lookup(&sk);
    if (!c)
        return 0;
    if (c->pid == 0)
        read_task(c);
    u64 now = bpf_ktime_get_ns();
    if (now - c->snapshot_ns >= SNAPSHOT_NS) {
        read_counters(skaddr, c);
        c->snapshot_ns = now;
    }
    return 0;
}

TRACEPOINT_PROBE(sock, sock_send_length) {
    return on_io(args->sk, args->protocol);
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    return on_io(args->sk, args->protocol);
}
