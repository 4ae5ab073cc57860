// TCP connection lifecycle, in the manner of BCC's tcplife: one event per connection when it
// closes, with counters read from the socket; user space asks for fresh counters of live
// connections when it reports them (see refresh below).
//
// Raw tracepoints (BPF_PROG_TYPE_RAW_TRACEPOINT): the program gets the tracepoint's own
// arguments (the socket, the states) and reads only what it needs from the socket, only when
// it needs it. For a classic tracepoint program the kernel first fills in the event's whole
// record (addresses, ports, ...) in a perf buffer on every state change.
//
// Only state changes are traced, about ten per connection, and most return at once: nothing
// runs per send or receive, so what the collector costs does not grow with the traffic a
// connection carries. What a connection's states do not say is read from its socket at the
// close (counters, addresses; which FINs were exchanged follows from the state it closed
// from), or when user space refreshes a live one.
//
// Struct layouts of this kernel differ from the headers BCC compiles against, so every field
// of struct sock / tcp_sock / net is read at a byte offset taken from the running kernel's BTF
// and passed in as a -D macro (see collectors/btf.py and OFFSETS in collectors/tcp_flows.py):
// SK_PROTOCOL, SKC_* (struct sock_common), INET_SPORT, TCP_* (struct tcp_sock), NET_NS_INUM.
// Fields read together are read in one copy of the span that holds them (a "window"): the
// SKC_WINDOW_* and TCP_WINDOW_* macros give its start (8-aligned) and length, also from BTF;
// where a kernel spreads them wider than MAX_WINDOW bytes, each field is read on its own.
// Also -D MAX_CONNS, RINGBUF_PAGES.

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
    u64 snapshot_ns;     // when refresh last read the counters below from the socket
    u64 bytes_acked;     // bytes this socket sent that the peer acknowledged
    u64 bytes_received;
    u64 segs_in;
    u64 segs_out;
    u64 cgroup_id;
    u32 srtt_us;
    u32 pid;             // 0 until known: an accepted socket is born in softirq context and
                         // learns its owner when the owner closes it
    u32 netns;
    u8 active;           // 1: this socket connect()ed; 0: it was accept()ed
    u8 reset;
    // The fields below are set at the close (in the event) and by refresh.
    u8 established;
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

// The TYPE field at byte offset OFF of a kernel struct, from W (a u64 array) that holds a copy
// of that struct from byte START on.
#define FIELD(W, START, OFF, TYPE) (*(TYPE *)((u8 *)(W) + (OFF) - (START)))

// Counters of the connection, straight from its tcp_sock.
static __always_inline void read_counters(void *sk, struct conn_t *c) {
#if TCP_WINDOW_LEN <= MAX_WINDOW
    u64 w[TCP_WINDOW_LEN / 8];
    bpf_probe_read_kernel(w, sizeof(w), sk + TCP_WINDOW_START);
    c->bytes_acked = FIELD(w, TCP_WINDOW_START, TCP_BYTES_ACKED, u64);
    c->bytes_received = FIELD(w, TCP_WINDOW_START, TCP_BYTES_RECEIVED, u64);
    c->segs_in = FIELD(w, TCP_WINDOW_START, TCP_SEGS_IN, u32);
    c->segs_out = FIELD(w, TCP_WINDOW_START, TCP_SEGS_OUT, u32);
    u32 srtt = FIELD(w, TCP_WINDOW_START, TCP_SRTT_US, u32);
#else
    u32 srtt = 0, segs = 0;
    bpf_probe_read_kernel(&c->bytes_acked, 8, sk + TCP_BYTES_ACKED);
    bpf_probe_read_kernel(&c->bytes_received, 8, sk + TCP_BYTES_RECEIVED);
    bpf_probe_read_kernel(&segs, 4, sk + TCP_SEGS_IN);
    c->segs_in = segs;
    bpf_probe_read_kernel(&segs, 4, sk + TCP_SEGS_OUT);
    c->segs_out = segs;
    bpf_probe_read_kernel(&srtt, 4, sk + TCP_SRTT_US);
#endif
    c->srtt_us = srtt >> 3;  // the kernel keeps srtt_us in units of 1/8 microsecond
}

// Addresses and ports (host byte order) as the classic tracepoint's record has them, and the
// network namespace, from the socket; returns the socket's state. The local port is
// inet_sock's inet_sport, which a closing socket keeps (its skc_num is cleared when the port
// is released, before the move to CLOSE is traced); the local address is skc_rcv_saddr, which
// is what inet_saddr holds for a connected socket.
static __always_inline u8 read_sock(void *sk, struct conn_t *c) {
    u16 family, dport, sport = 0;
    u8 state;
    void *net;
#if SKC_WINDOW_LEN <= MAX_WINDOW
    u64 w[SKC_WINDOW_LEN / 8];
    bpf_probe_read_kernel(w, sizeof(w), sk + SKC_WINDOW_START);
    family = FIELD(w, SKC_WINDOW_START, SKC_FAMILY, u16);
    dport = FIELD(w, SKC_WINDOW_START, SKC_DPORT, u16);
    state = FIELD(w, SKC_WINDOW_START, SKC_STATE, u8);
    net = FIELD(w, SKC_WINDOW_START, SKC_NET, void *);
    if (family == FAMILY_INET6) {
        __builtin_memcpy(c->saddr, (u8 *)w + SKC_V6_RCV_SADDR - SKC_WINDOW_START, 16);
        __builtin_memcpy(c->daddr, (u8 *)w + SKC_V6_DADDR - SKC_WINDOW_START, 16);
    } else {
        __builtin_memset(c->saddr, 0, 16);
        __builtin_memset(c->daddr, 0, 16);
        __builtin_memcpy(c->saddr, (u8 *)w + SKC_RCV_SADDR - SKC_WINDOW_START, 4);
        __builtin_memcpy(c->daddr, (u8 *)w + SKC_DADDR - SKC_WINDOW_START, 4);
    }
#else
    family = dport = 0;
    state = 0;
    net = 0;
    bpf_probe_read_kernel(&family, 2, sk + SKC_FAMILY);
    bpf_probe_read_kernel(&dport, 2, sk + SKC_DPORT);
    bpf_probe_read_kernel(&state, 1, sk + SKC_STATE);
    bpf_probe_read_kernel(&net, sizeof(net), sk + SKC_NET);
    if (family == FAMILY_INET6) {
        bpf_probe_read_kernel(c->saddr, 16, sk + SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(c->daddr, 16, sk + SKC_V6_DADDR);
    } else {
        __builtin_memset(c->saddr, 0, 16);
        __builtin_memset(c->daddr, 0, 16);
        bpf_probe_read_kernel(c->saddr, 4, sk + SKC_RCV_SADDR);
        bpf_probe_read_kernel(c->daddr, 4, sk + SKC_DADDR);
    }
#endif
    bpf_probe_read_kernel(&sport, 2, sk + INET_SPORT);
    c->family = family;
    c->sport = __builtin_bswap16(sport);
    c->dport = __builtin_bswap16(dport);
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, 4, net + NET_NS_INUM);
    c->netns = inum;
    return state;
}

static __always_inline void read_task(struct conn_t *c) {
    c->pid = bpf_get_current_pid_tgid() >> 32;
    c->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
}

// trace_inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
RAW_TRACEPOINT_PROBE(inet_sock_set_state) {
    void *skp = (void *)ctx->args[0];
    int old = (int)ctx->args[1];
    int state = (int)ctx->args[2];
    u64 sk = (u64)skp;

    if (state == ST_SYN_SENT || state == ST_SYN_RECV) {
        u16 protocol = 0;
        bpf_probe_read_kernel(&protocol, 2, skp + SK_PROTOCOL);
        if (protocol != PROTO_TCP)
            return 0;
        struct conn_t c = {};
        c.start_ns = bpf_ktime_get_ns();
        c.active = state == ST_SYN_SENT;
        if (c.active)
            read_task(&c);  // connect() runs in the caller's context
        if (live.insert(&sk, &c) != 0 && !live.lookup(&sk))
            count_lost(1);
        return 0;
    }
    // Our side closes (FIN_WAIT1: first; LAST_ACK: after the peer): the owner's close() or
    // shutdown(), run in its own context. An accepted socket, born in softirq context, learns
    // its owner here.
    if (state == ST_FIN_WAIT1 || state == ST_LAST_ACK) {
        struct conn_t *c = live.lookup(&sk);  // only TCP sockets are in the table
        if (c && c->pid == 0)
            read_task(c);
        return 0;
    }
    if (state != ST_CLOSE)
        return 0;  // the other states change nothing the record keeps
    struct conn_t *c = live.lookup(&sk);
    if (!c)
        return 0;  // not TCP, or opened before the collector attached

    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        count_lost(0);
        live.delete(&sk);
        return 0;
    }
    e->conn = *c;
    read_sock(skp, &e->conn);  // and the network namespace
    read_counters(skp, &e->conn);
    e->end_ns = bpf_ktime_get_ns();
    e->conn.established = old != ST_SYN_SENT && old != ST_SYN_RECV;
    // Which FINs were exchanged, from the state the connection closed from: the peer's FIN
    // arrived in CLOSE_WAIT, CLOSING and LAST_ACK; ours was acknowledged in FIN_WAIT2. CLOSING
    // and LAST_ACK close when our FIN is acknowledged, FIN_WAIT2 when the peer's FIN arrives
    // (or, rarely, on the FIN_WAIT2 timeout of an orphan, which this cannot tell apart), unless
    // a reset received (tcp_receive_reset) closed them.
    u8 reset_in = c->reset;
    e->conn.fin_in = old == ST_CLOSE_WAIT || old == ST_CLOSING || old == ST_LAST_ACK ||
                     (old == ST_FIN_WAIT2 && !reset_in);
    e->conn.fin_out_acked = old == ST_FIN_WAIT2 ||
                            ((old == ST_CLOSING || old == ST_LAST_ACK) && !reset_in);
    // Closing straight from these states means the connection was aborted, not shut down.
    if (old == ST_ESTABLISHED || old == ST_SYN_SENT || old == ST_SYN_RECV ||
        old == ST_CLOSE_WAIT || old == ST_FIN_WAIT1)
        e->conn.reset = 1;
    e->oldstate = old;
    // No wakeup per event: user space drains the buffer in batches (a wakeup per closed
    // connection would cost more than the event itself).
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    live.delete(&sk);
    return 0;
}

// trace_tcp_receive_reset(struct sock *sk)
RAW_TRACEPOINT_PROBE(tcp_receive_reset) {
    u64 sk = ctx->args[0];
    struct conn_t *c = live.lookup(&sk);
    if (c)
        c->reset = 1;
    return 0;
}

// Not attached anywhere: user space runs it (BPF_PROG_TEST_RUN) for one live connection,
// args[0] its socket, to read the connection's counters, addresses and state as they are now,
// for the periodic update of a long-lived connection. Returns 0 when the entry was refreshed,
// 1 when the connection has gone, 2 when it is not established yet.
int refresh(struct bpf_raw_tracepoint_args *ctx) {
    u64 sk = ctx->args[0];
    struct conn_t *c = live.lookup(&sk);
    if (!c)
        return 1;
    u8 state = read_sock((void *)sk, c);
    if (state == ST_SYN_SENT || state == ST_SYN_RECV)
        return 2;
    read_counters((void *)sk, c);
    c->established = 1;
    c->fin_in = state == ST_CLOSE_WAIT || state == ST_CLOSING || state == ST_LAST_ACK;
    c->fin_out_acked = state == ST_FIN_WAIT2;
    c->snapshot_ns = bpf_ktime_get_ns();
    return 0;
}
