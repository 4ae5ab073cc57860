"""What an eBPF collector needs from the machine, checked up front with errors that say what
to do: root, BTF, tracefs, Debian's BCC, and a kernel header tree for BCC to compile against."""

from __future__ import annotations

import os
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")


class CollectorError(RuntimeError):
    """The collector cannot run here; the message says why and what to do."""


def default_headers_dir() -> Path | None:
    """``$BCC_KERNEL_SOURCE``, else the header tree ``clover stack up`` fetched, if any."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return Path(os.environ["BCC_KERNEL_SOURCE"])
    from clover.config import load_settings
    from clover.stack import install

    return install.kernel_headers_dir(load_settings().stack.cache_dir)


def bpf_environment(headers_dir: Path | None = None) -> Path:
    """Check the machine and point BCC at the header tree; returns that tree.

    ``headers_dir`` defaults to :func:`default_headers_dir`. BCC reads $BCC_KERNEL_SOURCE when
    it compiles, so it is set here for this process.
    """
    if os.geteuid() != 0:
        raise CollectorError(
            "eBPF needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN): run the collector as root, "
            "e.g. `sudo .venv/bin/clover collect flows`")
    if not VMLINUX_BTF.exists():
        raise CollectorError(
            f"this kernel has no BTF ({VMLINUX_BTF}); the collectors read kernel struct offsets "
            "from it. Use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if not TRACEFS_EVENTS.is_dir():
        raise CollectorError(
            "tracefs is not mounted: `mount -t tracefs tracefs /sys/kernel/tracing` "
            "(`clover stack up` as root does it)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise CollectorError(
            "BCC is not importable: `apt-get install python3-bpfcc`, then `clover stack up` as "
            "root links Debian's bcc module into this virtualenv") from None
    try:
        from pyroute2 import IPRoute  # noqa: F401  (the packet counter's tc attachment)
    except ImportError:
        raise CollectorError("pyroute2 is not importable: `pip install pyroute2`") from None
    source = headers_dir or default_headers_dir()
    if source is None or not (source / "include").is_dir():
        raise CollectorError(
            f"no kernel header tree for BCC{f' at {source}' if source else ''}: run "
            "`clover stack up` as root to fetch kernel headers, or set BCC_KERNEL_SOURCE to a "
            "header tree")
    os.environ["BCC_KERNEL_SOURCE"] = str(source)
    return source
