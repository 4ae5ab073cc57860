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
