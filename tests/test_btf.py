"""collectors.btf: a hand-built BTF blob (runs anywhere), then the running kernel's BTF,
checked against layout facts that hold on every kernel and, when bpftool is installed,
against bpftool's own decoding of the same file."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from collectors import btf
from collectors.btf import Btf, BtfError, as_cflags
from collectors.tcp_flows import OFFSETS

# Real socket fields to check against bpftool, as macro name -> (struct, member path): a
# superset of what the TCP flow collector reads (collectors.tcp_flows.OFFSETS).
# All verified against this kernel's BTF (6.18). Notes:
# - skc_num is the local port in host order, skc_dport the remote port in network order.
# - skc_daddr/skc_rcv_saddr sit in anonymous unions/structs of sock_common (skc_addrpair).
# - skc_cookie is an atomic64_t; it stays 0 until something calls sock_gen_cookie().
# - sk_cgrp_data.cgroup -> cgroup.kn -> kernfs_node.id is the socket's cgroup id, and
#   sk_net -> net.ns.inum its network namespace inode (FlowRecord.cgroup_id, netns_ino).
TCP_FIELDS: dict[str, tuple[str, str]] = {
    "TCP_BYTES_RECEIVED": ("tcp_sock", "bytes_received"),
    "TCP_BYTES_ACKED": ("tcp_sock", "bytes_acked"),
    "TCP_BYTES_SENT": ("tcp_sock", "bytes_sent"),
    "TCP_SEGS_IN": ("tcp_sock", "segs_in"),
    "TCP_SEGS_OUT": ("tcp_sock", "segs_out"),
    "TCP_DATA_SEGS_IN": ("tcp_sock", "data_segs_in"),
    "TCP_DATA_SEGS_OUT": ("tcp_sock", "data_segs_out"),
    "TCP_SRTT_US": ("tcp_sock", "srtt_us"),
    "TCP_TOTAL_RETRANS": ("tcp_sock", "total_retrans"),
    "SK_FAMILY": ("sock", "__sk_common.skc_family"),
    "SK_NUM": ("sock", "__sk_common.skc_num"),
    "SK_DPORT": ("sock", "__sk_common.skc_dport"),
    "SK_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "SK_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SK_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "SK_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SK_STATE": ("sock", "__sk_common.skc_state"),
    "SK_COOKIE": ("sock", "__sk_common.skc_cookie"),
    "SK_NET": ("sock", "__sk_common.skc_net"),
    "SK_SOCKET": ("sock", "sk_socket"),
    "SK_CGRP_CGROUP": ("sock", "sk_cgrp_data.cgroup"),
    "CGROUP_KN": ("cgroup", "kn"),
    "KERNFS_NODE_ID": ("kernfs_node", "id"),
    "NET_NS_INUM": ("net", "ns.inum"),
}

VMLINUX = Path(btf.VMLINUX)


# --- a synthetic blob -------------------------------------------------------------------


class Builder:
    """Writes a BTF blob type by type; each add() returns the new type's id."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.types = b""
        self.strings = b"\0"
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: int, name: str = "", vlen: int = 0, size_or_type: int = 0,
            extra: Sequence[int] = (), kind_flag: int = 0) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack(f"{self.e}III", self.name(name), info, size_or_type)
        self.types += struct.pack(f"{self.e}{len(extra)}I", *extra)
        self.count += 1
        return self.count

    def members(self, kind: int, name: str, size: int, members: list[tuple[str, int, int]],
                kind_flag: int = 0) -> int:
        extra = [w for mname, mtype, off in members for w in (self.name(mname), mtype, off)]
        return self.add(kind, name, len(members), size, extra, kind_flag)

    def blob(self) -> bytes:
        header = struct.pack(f"{self.e}HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + self.types + self.strings


def synthetic(endian: str = "<") -> bytes:
    b = Builder(endian)
    # Every kind with trailing data comes first: skipping any of them wrongly shifts the ids
    # (and the offsets) of the structs below.
    b.add(btf.INT, "int", 0, 4, [(1 << 24) | 32])
    b.add(btf.ENUM, "colour", 2, 4, [b.name("RED"), 0, b.name("GREEN"), 1])
    b.add(btf.ENUM64, "big", 1, 8, [b.name("HUGE"), 0, 1])
    b.add(btf.FUNC_PROTO, "", 1, 1, [b.name("arg"), 1])
    b.add(btf.FUNC, "f", 1, 4)  # vlen is the linkage (global): no trailing data
    b.add(btf.VAR, "v", 0, 1, [1])
    b.add(btf.DATASEC, ".data", 1, 4, [6, 0, 4])
    b.add(btf.DECL_TAG, "tag", 0, 5, [0xFFFFFFFF])
    b.add(btf.ARRAY, "", 0, 0, [1, 1, 2])
    for kind in (btf.FWD, btf.VOLATILE, btf.RESTRICT, btf.TYPE_TAG, btf.FLOAT, btf.PTR):
        b.add(kind, "float" if kind == btf.FLOAT else "", 0, 8 if kind == btf.FLOAT else 1)
    ids = {"int": 1}
    ids["u16_base"] = b.add(btf.INT, "unsigned short", 0, 2, [16])
    ids["u16"] = b.add(btf.TYPEDEF, "u16", 0, ids["u16_base"])
    ids["const_u16"] = b.add(btf.CONST, "", 0, ids["u16"])
    halves = b.members(btf.STRUCT, "", 4, [("lo", ids["u16"], 0), ("hi", ids["u16"], 16)])
    # typedef'd anonymous struct inside an anonymous union, as sock_common does it
    halves_t = b.add(btf.TYPEDEF, "halves_t", 0, halves)
    word = b.members(btf.UNION, "", 4, [("word", 1, 0), ("", halves_t, 0)])
    ids["inner"] = b.members(btf.STRUCT, "inner", 8, [("a", 1, 0), ("b", 1, 32)])
    arr = b.add(btf.ARRAY, "", 0, 0, [1, 1, 3])
    ptr = b.add(btf.PTR, "", 0, ids["inner"])
    volatile_inner = b.add(btf.VOLATILE, "", 0, ids["inner"])
    ids["outer"] = b.members(btf.STRUCT, "outer", 48, [
        ("", word, 0),
        ("flags", 1, (3 << 24) | 32),  # kind_flag: 3-bit bitfield at bit 32
        ("c", ids["const_u16"], 48),
        ("in", volatile_inner, 64),
        ("arr", arr, 192),
        ("next", ptr, 320),
    ], kind_flag=1)
    # Without kind_flag a bitfield is an INT whose bits are fewer than its size.
    bits3 = b.add(btf.INT, "int", 0, 4, [(2 << 16) | 3])
    b.members(btf.STRUCT, "plain", 8, [("x", bits3, 8), ("y", 1, 32)])
    b.members(btf.STRUCT, "dup", 8, [("m", 1, 0)])
    b.members(btf.STRUCT, "dup", 8, [("m", 1, 32), ("only_here", 1, 0)])
    b.members(btf.UNION, "u", 8, [("p", ptr, 0), ("i", 1, 0)])
    assert b.count == 31
    return b.blob()


@pytest.fixture(scope="module", params=["<", ">"], ids=["little-endian", "big-endian"])
def small(request: pytest.FixtureRequest) -> Btf:
    return Btf(synthetic(request.param))


def test_synthetic_offsets_and_sizes(small: Btf) -> None:
    assert len(small) == 31
    assert small.struct_size("outer") == 48
    assert small.struct_size("inner") == 8
    assert small.struct_size("u") == 8
    # through the anonymous union, then the typedef'd anonymous struct
    assert small.member_offset("outer", "word") == 0
    assert small.member_offset("outer", "lo") == 0
    assert small.member_offset("outer", "hi") == 2
    assert small.member_size("outer", "hi") == 2
    assert small.member_offset("outer", "c") == 6
    assert small.member_size("outer", "c") == 2  # const -> typedef -> int
    assert small.member_offset("outer", "in") == 8
    assert small.member_size("outer", "in") == 8  # volatile struct
    assert small.member_offset("outer", "in.b") == 12  # nested, through the volatile
    assert small.member_offset("outer", "arr") == 24
    assert small.member_size("outer", "arr") == 12
    assert small.member_offset("outer", "next") == 40
    assert small.member_size("outer", "next") == 8
    assert small.member_offset("u", "i") == 0


def test_synthetic_bitfields(small: Btf) -> None:
    assert small.member_bit_offset("outer", "flags") == 32
    with pytest.raises(BtfError, match="outer.flags.*bitfield"):
        small.member_offset("outer", "flags")
    with pytest.raises(BtfError, match="bitfield"):
        small.member_size("outer", "flags")
    assert small.member_bit_offset("plain", "x") == 10  # member offset + INT encoding offset
    with pytest.raises(BtfError, match="plain.x"):
        small.member_offset("plain", "x")
    assert small.member_offset("plain", "y") == 4


def test_synthetic_errors(small: Btf) -> None:
    with pytest.raises(BtfError, match="'outer'.*'nope'"):
        small.member_offset("outer", "nope")
    with pytest.raises(BtfError, match="'outer'.*'in.nope'"):
        small.member_offset("outer", "in.nope")
    with pytest.raises(BtfError, match="'outer'.*'c.x'"):  # c is not a struct
        small.member_offset("outer", "c.x")
    with pytest.raises(BtfError, match="'missing'"):
        small.struct_size("missing")
    with pytest.raises(LookupError):
        small.member_offset("missing", "x")
    # two unrelated structs named "dup": fine when only one has the member, else ambiguous
    assert small.member_offset("dup", "only_here") == 0
    with pytest.raises(BtfError, match="ambiguous"):
        small.member_offset("dup", "m")


def test_synthetic_offsets_and_cflags(small: Btf) -> None:
    got = small.offsets({"OUTER_HI": ("outer", "hi"), "OUTER_IN_B": ("outer", "in.b")})
    assert got == {"OUTER_HI": 2, "OUTER_IN_B": 12}
    assert as_cflags(got) == ["-DOUTER_HI=2", "-DOUTER_IN_B=12"]


def test_rejects_bad_blobs() -> None:
    blob = synthetic()
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0\0" + blob[2:])
    # a type of unknown kind 31
    bad = Builder()
    bad.add(31, "x")
    with pytest.raises(BtfError, match="unknown BTF kind 31"):
        Btf(bad.blob())


# --- the running kernel ------------------------------------------------------------------

needs_vmlinux = pytest.mark.skipif(not VMLINUX.exists(),
                                   reason=f"{VMLINUX} is absent (kernel built without BTF)")


@pytest.fixture(scope="module")
def kernel() -> Btf:
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} is absent (kernel built without BTF)")
    return Btf.load()


@needs_vmlinux
def test_load_time(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    parsed = Btf.load()
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nparsed and indexed {len(parsed)} BTF types from {VMLINUX} "
              f"in {elapsed * 1000:.0f} ms")


@needs_vmlinux
def test_stable_socket_layout(kernel: Btf) -> None:
    """Facts of the sock/tcp_sock layout that every kernel keeps (the first members are
    embedded, and the address pair leads sock_common so it can be compared as one u64)."""
    assert kernel.member_offset("sock", "__sk_common") == 0
    assert kernel.member_offset("tcp_sock", "inet_conn") == 0
    assert kernel.member_offset("tcp_sock", "inet_conn.icsk_inet.sk.__sk_common.skc_daddr") == 0
    # skc_daddr and skc_rcv_saddr are found through sock_common's anonymous union and struct
    assert kernel.member_offset("sock_common", "skc_daddr") == 0
    assert kernel.member_offset("sock_common", "skc_rcv_saddr") == 4
    assert kernel.member_offset("sock_common", "skc_addrpair") == 0
    assert kernel.member_size("sock_common", "skc_addrpair") == 8
    assert kernel.member_size("sock", "__sk_common.skc_family") == 2
    assert kernel.member_size("sock", "__sk_common.skc_num") == 2
    assert kernel.member_size("sock", "__sk_common.skc_dport") == 2
    assert kernel.member_size("sock", "__sk_common.skc_state") == 1  # volatile unsigned char
    assert kernel.member_size("sock", "__sk_common.skc_v6_daddr") == 16
    assert kernel.member_size("sock", "__sk_common.skc_cookie") == 8  # atomic64_t
    assert kernel.member_size("tcp_sock", "bytes_received") == 8
    assert kernel.member_size("tcp_sock", "srtt_us") == 4
    # the dport/num pair is one u32 (skc_portpair), dport first
    assert (kernel.member_offset("sock_common", "skc_num")
            == kernel.member_offset("sock_common", "skc_dport") + 2
            == kernel.member_offset("sock_common", "skc_portpair") + 2)
    assert kernel.struct_size("sock_common") <= kernel.struct_size("sock")
    assert kernel.struct_size("sock") < kernel.struct_size("tcp_sock")
    with pytest.raises(BtfError, match="skc_reuse.*bitfield"):
        kernel.member_offset("sock_common", "skc_reuse")
    with pytest.raises(BtfError, match="'tcp_sock'.*'no_such_field'"):
        kernel.member_offset("tcp_sock", "no_such_field")


@needs_vmlinux
def test_tcp_fields_resolve(kernel: Btf) -> None:
    offsets = kernel.offsets(TCP_FIELDS)
    assert offsets.keys() == TCP_FIELDS.keys()
    for macro, (name, path) in TCP_FIELDS.items():
        size = kernel.member_size(name, path)
        assert size in (1, 2, 4, 8, 16), macro
        assert offsets[macro] + size <= kernel.struct_size(name), macro
    flags = as_cflags(offsets)
    assert f"-DTCP_BYTES_RECEIVED={offsets['TCP_BYTES_RECEIVED']}" in flags
    assert all(re.fullmatch(r"-D[A-Z0-9_]+=\d+", flag) for flag in flags)


def test_the_flow_collectors_fields_resolve_on_this_kernel(kernel: Btf) -> None:
    """Every offset the TCP program is compiled with exists in the running kernel."""
    offsets = kernel.offsets(OFFSETS)
    assert set(offsets) == set(OFFSETS)
    for macro, (name, path) in OFFSETS.items():
        assert offsets[macro] + kernel.member_size(name, path) <= kernel.struct_size(name)


# --- cross-check with bpftool's own decoding -------------------------------------------

HEADER = re.compile(r"\[(\d+)\] (\w+) '([^']*)'(.*)")
MEMBER = re.compile(r"\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")


class Dump:
    """`bpftool btf dump format raw`: types {id: {kind, name, attrs..., members}}, and the
    structs by name."""

    def __init__(self) -> None:
        out = subprocess.run(["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        self.types: dict[int, dict] = {}
        self.structs: dict[str, list[dict]] = {}
        current: dict | None = None
        for line in out.splitlines():
            if header := HEADER.fullmatch(line):
                current = dict(re.findall(r"(\w+)=(\S+)", header[4]), kind=header[2],
                               name=header[3], members=[])
                self.types[int(header[1])] = current
                if current["kind"] == "STRUCT":
                    self.structs.setdefault(current["name"], []).append(current)
            elif (member := MEMBER.fullmatch(line)) and current is not None:
                current["members"].append((member[1], int(member[2]), int(member[3]),
                                           int(member[4] or 0)))

    def struct(self, name: str) -> dict:
        [found] = self.structs[name]
        return found

    def strip(self, tid: int) -> dict:
        while self.types[tid]["kind"] in ("TYPEDEF", "VOLATILE", "CONST", "RESTRICT",
                                          "TYPE_TAG"):
            tid = int(self.types[tid]["type_id"])
        return self.types[tid]

    def bit_offset(self, name: str, path: str) -> int:
        def find(t: dict, member: str) -> tuple[dict, int] | None:
            for mname, mtype, bits, _ in t["members"]:
                if mname == member:
                    return self.strip(mtype), bits
                inner = self.strip(mtype)
                if mname == "(anon)" and inner["kind"] in ("STRUCT", "UNION"):
                    if found := find(inner, member):
                        return found[0], bits + found[1]
            return None

        total, t = 0, self.struct(name)
        for part in path.split("."):
            found = find(t, part)
            assert found, f"bpftool: {name} has no {path}"
            t, total = found[0], total + found[1]
        return total


@pytest.fixture(scope="module")
def bpftool(kernel: Btf) -> Dump:
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (apt-get install --no-install-recommends bpftool)")
    return Dump()


@needs_vmlinux
def test_tcp_fields_match_bpftool(kernel: Btf, bpftool: Dump) -> None:
    for macro, (name, path) in TCP_FIELDS.items():
        expected = bpftool.bit_offset(name, path)
        assert expected % 8 == 0, macro
        assert kernel.member_offset(name, path) == expected // 8, macro


@needs_vmlinux
@pytest.mark.parametrize("name", ["tcp_sock", "sock", "sock_common", "inet_sock",
                                  "inet_connection_sock", "sk_buff", "task_struct"])
def test_every_member_matches_bpftool(kernel: Btf, bpftool: Dump, name: str) -> None:
    expected = bpftool.struct(name)
    assert kernel.struct_size(name) == int(expected["size"])
    named = [m for m in expected["members"] if m[0] != "(anon)"]
    assert len(named) > 5
    for mname, _, bits, bitfield in named:
        assert kernel.member_bit_offset(name, mname) == bits, mname
        if not bitfield:
            assert kernel.member_offset(name, mname) == bits // 8, mname
