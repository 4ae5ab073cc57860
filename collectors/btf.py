"""Struct member offsets from the running kernel's BTF, for BCC programs.

The collectors compile their BPF C with BCC against Debian 12's 6.1 kernel headers (the
running kernel ships none), but they run on a newer custom kernel whose struct layouts
differ: reading ``tcp_sock->bytes_received`` through the header layout returns garbage. So at
start-up we read the byte offsets of the fields we need from the running kernel's BTF
(``/sys/kernel/btf/vmlinux``, https://docs.kernel.org/bpf/btf.html), pass them as ``-D``
macros (:func:`as_cflags`), and the program reads with
``bpf_probe_read_kernel(&v, sizeof(v), (void *)sk + TCP_BYTES_RECEIVED)``.

Why not libbpf through ctypes: BTF is a documented, stable binary format that takes ~150
lines of pure Python to read, with no native library to install and no ABI to keep in step.
Only vmlinux (base) BTF is supported, not split module BTF.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

VMLINUX = "/sys/kernel/btf/vmlinux"

# BTF kinds (include/uapi/linux/btf.h).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

MODIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})
# Bytes after the 12-byte btf_type: a fixed part, plus vlen records of the given size.
# (FUNC's vlen is its linkage, not a count: it has no trailing data.)
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_VLEN = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_KNOWN = frozenset(range(1, 20))
POINTER_SIZE = 8  # BTF does not record it; x86_64 and arm64


class BtfError(LookupError):
    """A struct or member is missing or not byte-addressable, or the blob is not valid BTF."""



class Btf:
    """A parsed BTF blob: type records indexed by id, structs and unions by name."""

    def __init__(self, data: bytes) -> None:
        if data[:2] == b"\x9f\xeb":
            self._e = "<"
        elif data[:2] == b"\xeb\x9f":
            self._e = ">"
        else:
            raise BtfError(f"not BTF: bad magic {data[:2].hex()}")
        _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            self._e + "HBBIIIII", data)
        self._data = data
        self._strings = (hdr_len + str_off, hdr_len + str_off + str_len)
        # One pass: _pos[id] is the byte offset of type `id`'s btf_type (id 0 is void), and
        # _by_name indexes named structs and unions (vmlinux has ~10k of ~120k types).
        self._pos: list[int] = [0]
        self._by_name: dict[str, list[int]] = {}
        header = struct.Struct(self._e + "III").unpack_from
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, _ = header(data, pos)
            kind = (info >> 24) & 0x1F
            if kind not in _KNOWN:
                raise BtfError(f"unknown BTF kind {kind} for type id {len(self._pos)}")
            if (kind == STRUCT or kind == UNION) and name_off:
                self._by_name.setdefault(self._name(name_off), []).append(len(self._pos))
            self._pos.append(pos)
            pos += 12 + _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * (info & 0xFFFF)
        if pos != end:
            raise BtfError("BTF type section is truncated")

    @classmethod
    def load(cls, path: str | Path = VMLINUX) -> Btf:
        return cls(Path(path).read_bytes())

    def __len__(self) -> int:
        """The number of types, not counting void."""
        return len(self._pos) - 1

    # --- raw records ---------------------------------------------------------------

    def _type(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, name_off, vlen, kind_flag, size_or_type) of type `tid`."""
        if not 0 < tid < len(self._pos):
            raise BtfError(f"no BTF type id {tid}")
        name_off, info, size = struct.unpack_from(self._e + "III", self._data, self._pos[tid])
        return (info >> 24) & 0x1F, name_off, info & 0xFFFF, info >> 31, size

    def _name(self, name_off: int) -> str:
        start = self._strings[0] + name_off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _extra(self, tid: int, index: int = 0, count: int = 1) -> tuple[int, ...]:
        """`count` u32 words of trailing data of type `tid`, from word `index`."""
        return struct.unpack_from(f"{self._e}{count}I", self._data, self._pos[tid] + 12 + 4 * index)

    # --- resolution --------------------------------------------------------------------

    def _strip(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        while tid and self._type(tid)[0] in MODIFIERS:
            tid = self._type(tid)[4]
        return tid

    def _type_size(self, tid: int) -> int:
        tid = self._strip(tid)
        kind, _, _, _, size = self._type(tid) if tid else (0, 0, 0, 0, 0)
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return size
        if kind == PTR:
            return POINTER_SIZE
        if kind == ARRAY:
            elem, _, nelems = self._extra(tid, 0, 3)
            return self._type_size(elem) * nelems
        raise BtfError(f"BTF type id {tid} (kind {kind}) has no size")

    def _members(self, tid: int) -> Iterator[tuple[str, int, int, int]]:
        """(name, type, bit offset, bitfield size or 0) of each member of a struct/union."""
        _, _, vlen, kind_flag, _ = self._type(tid)
        for i in range(vlen):
            name_off, mtype, offset = self._extra(tid, 3 * i, 3)
            if kind_flag:
                yield self._name(name_off), mtype, offset & 0xFFFFFF, offset >> 24
                continue
            bits = 0  # without kind_flag, a bitfield is an INT narrower than its size
            base = self._strip(mtype)
            if base and self._type(base)[0] == INT:
                encoding = self._extra(base)[0]
                offset += (encoding >> 16) & 0xFF
                if encoding & 0xFF != 8 * self._type(base)[4]:
                    bits = encoding & 0xFF
            yield self._name(name_off), mtype, offset, bits

    def _find(self, tid: int, name: str) -> tuple[int, int, int] | None:
        """(type, bit offset, bitfield size) of member `name`, through anonymous members."""
        for mname, mtype, offset, bits in self._members(tid):
            if mname == name:
                return mtype, offset, bits
            if not mname:  # an anonymous struct/union: its members are the parent's
                inner = self._strip(mtype)
                if inner and self._type(inner)[0] in (STRUCT, UNION):
                    found = self._find(inner, name)
                    if found:
                        return found[0], offset + found[1], found[2]
        return None

    def _ids(self, name: str) -> list[int]:
        ids = self._by_name.get(name)
        if not ids:
            raise BtfError(f"no struct or union {name!r} in this BTF")
        return ids

    def _resolve(self, struct_name: str, path: str) -> tuple[int, int, int]:
        """(type, bit offset, bitfield size) of a dotted member path, agreed by all
        structs of that name that have it (vmlinux has a few unrelated same-name structs)."""
        results = set()
        for tid in self._ids(struct_name):
            mtype, offset, bits = tid, 0, 0
            for part in path.split("."):
                inner = self._strip(mtype)
                found = (self._find(inner, part)
                         if inner and self._type(inner)[0] in (STRUCT, UNION) else None)
                if found is None:
                    break
                mtype, offset, bits = found[0], offset + found[1], found[2]
            else:
                results.add((mtype, offset, bits))
        if not results:
            raise BtfError(f"struct {struct_name!r} has no member {path!r}")
        if len(results) > 1:
            raise BtfError(f"{struct_name}.{path} is ambiguous: {len(results)} layouts")
        return results.pop()

    # --- public API ------------------------------------------------------------------

    def member_bit_offset(self, struct_name: str, path: str) -> int:
        """Bit offset of a member (bitfields included) from the start of the struct."""
        return self._resolve(struct_name, path)[1]

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted, possibly nested) member path from the start of the struct."""
        _, offset, bits = self._resolve(struct_name, path)
        if bits or offset % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield, not byte-addressable; "
                           "use member_bit_offset")
        return offset // 8

    def member_size(self, struct_name: str, path: str) -> int:
        """Byte size of a member's type (typedefs and modifiers resolved)."""
        mtype, _, bits = self._resolve(struct_name, path)
        if bits:
            raise BtfError(f"{struct_name}.{path} is a {bits}-bit bitfield")
        return self._type_size(mtype)

    def struct_size(self, name: str) -> int:
        sizes = {self._type(tid)[4] for tid in self._ids(name)}
        if len(sizes) > 1:
            raise BtfError(f"struct {name!r} is ambiguous: sizes {sorted(sizes)}")
        return sizes.pop()

    def offsets(self, wanted: dict[str, tuple[str, str]]) -> dict[str, int]:
        """{"MACRO": (struct, path)} -> {"MACRO": byte offset}."""
        return {macro: self.member_offset(s, path) for macro, (s, path) in wanted.items()}


def as_cflags(offsets: dict[str, int]) -> list[str]:
    """{"TCP_BYTES_RECEIVED": 1752} -> ["-DTCP_BYTES_RECEIVED=1752"], for BPF(cflags=...)."""
    return [f"-D{macro}={value}" for macro, value in offsets.items()]
