"""Certificates for the local cluster, made with openssl.

One CA signs everything: the apiserver's serving certificate (SANs for 127.0.0.1, the
first service IP and the kubernetes.default names) and one client certificate per
identity. Kubernetes reads a client certificate's CN as the user and its O as the groups.
The CA key is also the controller-manager's cluster-signing key. A separate key pair signs
and verifies service-account tokens (ES256).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR, as the apiserver picks it
APISERVER_SANS = (
    "IP:127.0.0.1",
    f"IP:{KUBERNETES_SERVICE_IP}",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Identity:
    """A client certificate's file stem, user (CN) and groups (O)."""

    name: str
    user: str
    groups: tuple[str, ...] = ()


def client_identities(node_name: str) -> list[Identity]:
    return [
        Identity("admin", "admin", ("system:masters",)),
        Identity("kube-controller-manager", "system:kube-controller-manager"),
        Identity("kube-scheduler", "system:kube-scheduler"),
        Identity("node-agent", f"system:node:{node_name}", ("system:nodes",)),
    ]


def subject(user: str, groups: tuple[str, ...] = ()) -> str:
    """openssl -subj string; O= repeated once per group."""
    return "".join(f"/O={g}" for g in groups) + f"/CN={user}"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr.strip()}")


def _genkey(name: str, cwd: Path) -> None:
    # ECDSA P-256: what kubeadm can use too, and far faster to make than RSA on 2 busy cores.
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name,
        cwd=cwd,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def make_pki(directory: Path, node_name: str, days: int = 365) -> Pki:
    """Create (or keep, if already there) every key and certificate the cluster uses."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the cluster's certificates need openssl: apt-get install openssl")
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = str(days)
    if not pki.ca_crt.exists():
        _genkey("ca.key", directory)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=shoal-local-ca",
            "-days", d, "-out", "ca.crt", cwd=directory,
        )  # fmt: skip
    if not pki.sa_key.exists():
        _genkey("sa.key", directory)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    leaves = [(Identity("apiserver", "kube-apiserver"), True)]
    leaves += [(ident, False) for ident in client_identities(node_name)]
    for ident, serving in leaves:
        if pki.crt(ident.name).exists():
            continue
        ext = directory / f"{ident.name}.ext"
        usage = "serverAuth" if serving else "clientAuth"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
        lines.append(f"extendedKeyUsage={usage}")
        if serving:
            lines.append("subjectAltName=" + ",".join(APISERVER_SANS))
        ext.write_text("\n".join(lines) + "\n")
        _genkey(f"{ident.name}.key", directory)
        _openssl(
            "req", "-new", "-key", f"{ident.name}.key", "-subj", subject(ident.user, ident.groups),
            "-out", f"{ident.name}.csr", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{ident.name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", d, "-extfile", ext.name, "-out", f"{ident.name}.crt",
            cwd=directory,
        )  # fmt: skip
    return pki
