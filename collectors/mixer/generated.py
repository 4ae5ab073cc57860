"""The Python modules generated from Clover's Mixer protos (``collectors/mixer/proto``).

The generated code is never committed: on first import this module runs grpcio-tools'
``protoc`` into a cache directory, ``$XDG_CACHE_HOME/clover/mixer-proto/<hash>`` (by default
``~/.cache/clover/mixer-proto/<hash>``), and imports the modules from there. The hash covers
the .proto files and the grpcio-tools and protobuf versions, so editing a .proto (or
upgrading either package) regenerates the code automatically; an unchanged build reuses it.

Import the modules from here: ``policy_pb2`` (istio.policy.v1beta1), ``report_pb2``
(istio.mixer.adapter.model.v1beta1), ``tracespan_pb2`` and ``metric_pb2`` with their gRPC
stubs and servicers in ``tracespan_pb2_grpc`` and ``metric_pb2_grpc``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from types import ModuleType
from typing import Any

PROTO_DIR = Path(__file__).resolve().parent / "proto"
# Dependencies first: each generated module imports the ones before it by name.
_MODULES = ("mixer_policy_pb2", "mixer_report_pb2", "mixer_tracespan_pb2",
            "mixer_tracespan_pb2_grpc", "mixer_metric_pb2", "mixer_metric_pb2_grpc")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clover" / "mixer-proto"


def source_hash() -> str:
    """Identifies one generation: the .proto files and the versions of the generator and of
    the runtime the generated code must match."""
    digest = hashlib.sha256()
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        digest.update(proto.name.encode() + b"\0" + proto.read_bytes() + b"\0")
    for package in ("grpcio-tools", "protobuf"):
        digest.update(f"{package}={version(package)}\0".encode())
    return digest.hexdigest()[:20]


def generate(target: Path) -> Path:
    """Run protoc into ``target`` unless a finished generation is already there."""
    if target.is_dir():
        return target
    from grpc_tools import protoc  # only needed when (re)generating

    target.parent.mkdir(parents=True, exist_ok=True)
    # Generate beside the target and rename: a directory that exists is complete, even when
    # two processes generate at once.
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        well_known = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
        protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
        status = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
                              f"--python_out={work}", f"--grpc_python_out={work}", *protos])
        if status != 0:
            raise RuntimeError(f"protoc failed ({status}) on {PROTO_DIR}; see its output above")
        try:
            work.rename(target)
        except OSError:
            if not target.is_dir():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _load(directory: Path) -> dict[str, ModuleType]:
    """Import the generated modules by file, registering each under its own name (which is
    how the others import it) without putting the cache directory on sys.path."""
    loaded: dict[str, ModuleType] = {}
    for name in _MODULES:
        if name in sys.modules:  # e.g. this module reloaded: the descriptors exist already
            loaded[name] = sys.modules[name]
            continue
        spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        loaded[name] = module
    return loaded


GENERATED_DIR = generate(cache_root() / source_hash())
_loaded = _load(GENERATED_DIR)

# Typed as Any: the modules are built at run time, so static checkers cannot see into them.
policy_pb2: Any = _loaded["mixer_policy_pb2"]
report_pb2: Any = _loaded["mixer_report_pb2"]
tracespan_pb2: Any = _loaded["mixer_tracespan_pb2"]
tracespan_pb2_grpc: Any = _loaded["mixer_tracespan_pb2_grpc"]
metric_pb2: Any = _loaded["mixer_metric_pb2"]
metric_pb2_grpc: Any = _loaded["mixer_metric_pb2_grpc"]
