"""Run a loaded BPF program once, from user space, with arguments of our choosing
(``BPF_PROG_TEST_RUN``, https://docs.kernel.org/bpf/bpf_prog_run.html).

The flow collector uses it to read a live connection's socket on demand: a raw-tracepoint
program that is attached nowhere, given the socket's address as its first argument. That is one
system call per live connection per update interval, instead of a program run on every send and
receive of every socket to keep counters fresh. BCC's Python API does not expose the command,
so it is one ``bpf(2)`` call through ctypes; the attribute layout is kernel ABI
(``union bpf_attr``'s ``test`` member in include/uapi/linux/bpf.h).
"""

from __future__ import annotations

import ctypes
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_TEST_RUN = 10
_MAX_ARGS = 12  # MAX_BPF_FUNC_ARGS: a raw tracepoint program's ctx is at most this many u64


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class RawTracepointRunner:
    """Runs one loaded raw-tracepoint program (its fd) with up to 12 u64 arguments; ``run``
    returns what the program returned. Not thread-safe: the call buffers are reused."""

    def __init__(self, prog_fd: int, nargs: int = 1) -> None:
        machine = platform.machine()
        if machine not in _SYS_BPF:
            raise OSError(f"bpf(2) system call number unknown on {machine}")
        if not 0 < nargs <= _MAX_ARGS:
            raise ValueError(f"nargs must be 1 to {_MAX_ARGS}, not {nargs}")
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._nr = _SYS_BPF[machine]
        self._args = (ctypes.c_uint64 * nargs)()
        self._attr = _TestRunAttr(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(self._args),
                                  ctx_in=ctypes.addressof(self._args))
        self._attr_ref = ctypes.byref(self._attr)
        self._attr_size = ctypes.sizeof(self._attr)

    def run(self, *args: int) -> int:
        for i, arg in enumerate(args):
            self._args[i] = arg
        if self._syscall(self._nr, _BPF_PROG_TEST_RUN, self._attr_ref, self._attr_size) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"BPF_PROG_TEST_RUN: {os.strerror(errno)}")
        return int(self._attr.retval)
