// Packet and byte counters per 5-tuple, on tc clsact ingress and egress (BCC, SCHED_CLS,
// direct-action). Loaded and drained by collectors/packets.py.
//
// Every packet updates one entry of a hash map in the kernel; user space drains the map
// periodically (lookup-and-delete), so there is never one event per packet to user space.
//
// * TCP, UDP, ICMP and ICMPv6 over IPv4/IPv6 (after at most one 802.1Q/802.1ad tag) are counted
//   in `flows` per {family, proto, direction, ifindex, saddr, daddr, sport, dport}.
//   For ICMP/ICMPv6 sport holds the type and dport the code. A non-first IPv4 fragment has
//   no L4 header, so its ports (type/code) are 0.
// * Everything else (ARP, IPv6 with an extension header first, other L4 protocols, ...) is
//   counted per {ifindex, direction} in `other`, so interface totals stay complete.
// * bytes = skb->len: the L2 frame length as tc sees it (Ethernet header included, FCS and a
//   VLAN tag that the NIC/kernel took out of band excluded). For a GSO/GRO aggregate it is the
//   aggregate's length; packets counts its segments (skb->gso_segs), i.e. wire packets.
// * An update that fails because a map is full is counted in `dropped_updates` (per CPU), so
//   loss is visible, never silent.
//
// * With -DHTTP: plaintext HTTP/1.x exchanges, as Clover's clovisor and Pixie read them. A TCP
//   segment whose payload starts with a request method keeps the start of its request line in
//   `http_requests`, keyed by the connection (client and server ends); the first segment of the
//   reverse direction that starts with an HTTP/1.x status line (1xx aside) completes it, and
//   one record (request line start, status, both times) goes to the `http_events` ring buffer:
//   one event per exchange, never per packet. A retransmitted request (same sequence number)
//   keeps its first time; pipelined requests on one connection are not told apart (the last
//   one wins); a request that never gets an answer ages out of the LRU table.
//
// The program returns TC_ACT_UNSPEC, never a verdict: in direct-action mode TC_ACT_OK would end
// classification and skip any filter after ours (e.g. a CNI's policy filter), while UNSPEC
// lets the next filter run and, at the end of the chain, lets the packet pass unchanged.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifndef MAX_ENTRIES
#define MAX_ENTRIES 65536
#endif

#define FAMILY_INET 2   // AF_INET
#define FAMILY_INET6 10 // AF_INET6
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58

struct flow_key {
    u8 family;    // FAMILY_INET or FAMILY_INET6
    u8 proto;     // PROTO_*
    u8 direction; // 0 ingress, 1 egress
    u8 pad;       // explicit, so that the whole key is zeroed (keys are compared as bytes)
    u32 ifindex;  // in the interface's own network namespace
    u8 saddr[16]; // IPv4: first 4 bytes, rest zero
    u8 daddr[16];
    u16 sport;    // host byte order; ICMP type
    u16 dport;    // host byte order; ICMP code
};

struct iface_key {
    u32 ifindex;
    u32 direction;
};

struct counts {
    u64 packets;
    u64 bytes;
};

BPF_HASH(flows, struct flow_key, struct counts, MAX_ENTRIES);

#ifdef HTTP
#define HTTP_LINE 96  // bytes of a request kept from its start: method, path, version

struct http_key {
    u8 family;
    u8 pad[3];
    u8 client[16];
    u8 server[16];
    u16 client_port;  // host byte order
    u16 server_port;
};

struct http_request {
    u64 request_ns;
    u32 seq;          // the request segment's sequence number: a retransmission has the same
    u32 ifindex;
    u16 line_len;
    u8 direction;     // of the request segment: 0 ingress, 1 egress
    u8 pad;
    u8 line[HTTP_LINE];
};

struct http_event {
    struct http_key key;
    struct http_request request;
    u64 response_ns;
    u32 status;
};

BPF_TABLE("lru_hash", struct http_key, struct http_request, http_requests, MAX_HTTP);
BPF_RINGBUF_OUTPUT(http_events, HTTP_PAGES);
BPF_PERCPU_ARRAY(http_lost, u64, 1);  // exchanges whose event found the ring buffer full
#endif
BPF_HASH(other, struct iface_key, struct counts, 1024);
BPF_PERCPU_ARRAY(dropped_updates, u64, 1);

static __always_inline void note_dropped(void) {
    int zero = 0;
    u64 *dropped = dropped_updates.lookup(&zero);
    if (dropped)
        __sync_fetch_and_add(dropped, 1);
}

// lookup, else insert zeroes (BPF_NOEXIST: if another CPU inserted first we simply use its
// entry) and look up again. Still missing means the map is full (or the entry was drained
// between the two calls): count the loss.
static __always_inline void add_flow(struct flow_key *key, u32 packets, u64 bytes) {
    struct counts *c = flows.lookup(key);
    if (!c) {
        struct counts zero = {};
        flows.insert(key, &zero);
        c = flows.lookup(key);
    }
    if (!c) {
        note_dropped();
        return;
    }
    __sync_fetch_and_add(&c->packets, packets);
    __sync_fetch_and_add(&c->bytes, bytes);
}

static __always_inline void add_other(struct iface_key *key, u32 packets, u64 bytes) {
    struct counts *c = other.lookup(key);
    if (!c) {
        struct counts zero = {};
        other.insert(key, &zero);
        c = other.lookup(key);
    }
    if (!c) {
        note_dropped();
        return;
    }
    __sync_fetch_and_add(&c->packets, packets);
    __sync_fetch_and_add(&c->bytes, bytes);
}

// Big-endian 16-bit load; < 0 when the packet is too short.
static __always_inline int load_be16(struct __sk_buff *skb, u32 off) {
    u8 b[2];
    if (bpf_skb_load_bytes(skb, off, b, 2) < 0)
        return -1;
    return (b[0] << 8) | b[1];
}

#ifdef HTTP
static __always_inline int is_digit(u8 c) {
    return c >= '0' && c <= '9';
}

// The first four bytes of a request line, for the methods of RFC 9110 (user space checks the
// whole token).
static __always_inline int is_request(u8 *h) {
    u32 w = h[0] | h[1] << 8 | h[2] << 16 | (u32)h[3] << 24;
#define W(a, b, c, d) ((a) | (b) << 8 | (c) << 16 | (u32)(d) << 24)
    return w == W('G', 'E', 'T', ' ') || w == W('P', 'O', 'S', 'T') ||
           w == W('P', 'U', 'T', ' ') || w == W('H', 'E', 'A', 'D') ||
           w == W('D', 'E', 'L', 'E') || w == W('P', 'A', 'T', 'C') ||
           w == W('O', 'P', 'T', 'I') || w == W('C', 'O', 'N', 'N') ||
           w == W('T', 'R', 'A', 'C');
#undef W
}

// A TCP segment's payload, if it starts an HTTP/1.x request or response.
static __always_inline void http(struct __sk_buff *skb, struct flow_key *key, u32 l4) {
    u8 doff = 0;
    if (bpf_skb_load_bytes(skb, l4 + 12, &doff, 1) < 0)
        return;
    u32 payload = l4 + (doff >> 4) * 4;
    if (skb->len < payload + 12)  // shorter than "HTTP/1.1 200" or "GET / HTTP/"
        return;
    u8 h[12];
    if (bpf_skb_load_bytes(skb, payload, h, 12) < 0)
        return;
    struct http_key hk = {.family = key->family};
    if (h[0] == 'H' && h[1] == 'T' && h[2] == 'T' && h[3] == 'P' && h[4] == '/' &&
        h[5] == '1' && h[6] == '.' && h[8] == ' ' && is_digit(h[9]) && is_digit(h[10]) &&
        is_digit(h[11])) {
        u32 status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
        if (status < 200)
            return;  // interim (100 Continue, ...): the final answer is still to come
        __builtin_memcpy(hk.client, key->daddr, 16);
        __builtin_memcpy(hk.server, key->saddr, 16);
        hk.client_port = key->dport;
        hk.server_port = key->sport;
        struct http_request *req = http_requests.lookup(&hk);
        if (!req)
            return;
        struct http_event *e = http_events.ringbuf_reserve(sizeof(struct http_event));
        if (e) {
            e->key = hk;
            e->request = *req;
            e->response_ns = bpf_ktime_get_ns();
            e->status = status;
            http_events.ringbuf_submit(e, 0);
        } else {
            int zero = 0;
            u64 *lost = http_lost.lookup(&zero);
            if (lost)
                (*lost)++;
        }
        http_requests.delete(&hk);
        return;
    }
    if (!is_request(h))
        return;
    __builtin_memcpy(hk.client, key->saddr, 16);
    __builtin_memcpy(hk.server, key->daddr, 16);
    hk.client_port = key->sport;
    hk.server_port = key->dport;
    u8 s[4];
    if (bpf_skb_load_bytes(skb, l4 + 4, s, 4) < 0)
        return;
    u32 seq = (u32)s[0] << 24 | s[1] << 16 | s[2] << 8 | s[3];
    struct http_request *seen = http_requests.lookup(&hk);
    if (seen && seen->seq == seq)
        return;  // a retransmission: the request began when it was first sent
    struct http_request r = {};
    r.request_ns = bpf_ktime_get_ns();
    r.seq = seq;
    r.ifindex = skb->ifindex;
    r.direction = key->direction;
    // Fixed-size loads (the verifier takes those as they are): the most of 96, 64, 32 or 16
    // bytes the segment has.
    u32 n = skb->len - payload;
    int err;
    if (n >= 96) {
        err = bpf_skb_load_bytes(skb, payload, r.line, 96);
        n = 96;
    } else if (n >= 64) {
        err = bpf_skb_load_bytes(skb, payload, r.line, 64);
        n = 64;
    } else if (n >= 32) {
        err = bpf_skb_load_bytes(skb, payload, r.line, 32);
        n = 32;
    } else if (n >= 16) {
        err = bpf_skb_load_bytes(skb, payload, r.line, 16);
        n = 16;
    } else {
        err = bpf_skb_load_bytes(skb, payload, r.line, 12);
        n = 12;
    }
    if (err < 0)
        return;
    r.line_len = n;
    http_requests.update(&hk, &r);
}
#endif

// bpf_skb_load_bytes rather than direct packet access: it also reads headers that are not in
// the skb's linear part, and keeps the verifier happy without bounds-check gymnastics.
static __always_inline int count(struct __sk_buff *skb, u8 direction) {
    u32 packets = skb->gso_segs ? skb->gso_segs : 1;
    u64 bytes = skb->len;

    struct flow_key key;
    __builtin_memset(&key, 0, sizeof(key));
    key.direction = direction;
    key.ifindex = skb->ifindex;

    u32 off = 12; // EtherType
    int eth_proto = load_be16(skb, off);
    off = 14;
    if (eth_proto == 0x8100 || eth_proto == 0x88a8) { // one VLAN tag
        eth_proto = load_be16(skb, 16);
        off = 18;
    }

    u8 proto = 0;
    u32 l4 = 0; // offset of the L4 header; 0 when absent (non-first fragment)
    if (eth_proto == 0x0800) {
        u8 ver_ihl = 0;
        if (bpf_skb_load_bytes(skb, off, &ver_ihl, 1) < 0)
            goto other;
        u32 ihl = (ver_ihl & 0x0f) * 4;
        if ((ver_ihl >> 4) != 4 || ihl < 20)
            goto other;
        int frag = load_be16(skb, off + 6);
        if (frag < 0 || bpf_skb_load_bytes(skb, off + 9, &proto, 1) < 0 ||
            bpf_skb_load_bytes(skb, off + 12, key.saddr, 4) < 0 ||
            bpf_skb_load_bytes(skb, off + 16, key.daddr, 4) < 0)
            goto other;
        key.family = FAMILY_INET;
        if ((frag & 0x1fff) == 0)
            l4 = off + ihl;
        if (proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP)
            goto other;
    } else if (eth_proto == 0x86dd) {
        // No extension-header walk: a packet whose first next-header is not TCP, UDP or
        // ICMPv6 (hop-by-hop, fragment, ...) counts as "other".
        if (bpf_skb_load_bytes(skb, off + 6, &proto, 1) < 0 ||
            bpf_skb_load_bytes(skb, off + 8, key.saddr, 16) < 0 ||
            bpf_skb_load_bytes(skb, off + 24, key.daddr, 16) < 0)
            goto other;
        key.family = FAMILY_INET6;
        l4 = off + 40;
        if (proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMPV6)
            goto other;
    } else {
        goto other;
    }
    key.proto = proto;

    if (l4) {
        // Ports, or ICMP type and code: the first 4 resp. 2 bytes of the L4 header.
        u8 l4b[4] = {};
        u32 len = (proto == PROTO_TCP || proto == PROTO_UDP) ? 4 : 2;
        if (bpf_skb_load_bytes(skb, l4, l4b, len) < 0)
            goto other;
        if (len == 4) {
            key.sport = (l4b[0] << 8) | l4b[1];
            key.dport = (l4b[2] << 8) | l4b[3];
        } else {
            key.sport = l4b[0];
            key.dport = l4b[1];
        }
    }
    add_flow(&key, packets, bytes);
#ifdef HTTP
    if (proto == PROTO_TCP && l4)
        http(skb, &key, l4);
#endif
    return TC_ACT_UNSPEC;

other:;
    struct iface_key ik = {.ifindex = skb->ifindex, .direction = direction};
    add_other(&ik, packets, bytes);
    return TC_ACT_UNSPEC;
}

int clover_ingress(struct __sk_buff *skb) {
    return count(skb, 0);
}

int clover_egress(struct __sk_buff *skb) {
    return count(skb, 1);
}
