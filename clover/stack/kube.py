"""The local Kubernetes control plane: kube-apiserver and kube-controller-manager 1.20.2.

There is no kubelet or scheduler (pods stay Pending), but Deployments get ReplicaSets and
revisions, which is what Clover's attribution and rollback need. The API server is TLS-only
with its own CA; identities are static tokens (admin, controller-manager) and the pipeline's
ServiceAccount, whose token comes from the TokenRequest API.
"""

from __future__ import annotations

import csv
import secrets
import ssl
import subprocess
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clover.stack import install
from clover.stack.process import StackError
from clover.stack.servers import Server, _http_json

ADMIN_USER = "clover-admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
# Service account tokens live this long; every `clover stack up` issues a fresh one.
PIPELINE_TOKEN_SECONDS = 30 * 24 * 3600


class Pki:
    """A CA, the API server's certificate, the service-account signing key and static tokens."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    ca_crt = property(lambda self: self.dir / "ca.crt")
    ca_key = property(lambda self: self.dir / "ca.key")
    server_crt = property(lambda self: self.dir / "apiserver.crt")
    server_key = property(lambda self: self.dir / "apiserver.key")
    sa_key = property(lambda self: self.dir / "service-account.key")
    sa_pub = property(lambda self: self.dir / "service-account.pub")
    tokens_csv = property(lambda self: self.dir / "tokens.csv")

    def ensure(self) -> None:
        """Create whatever is missing; an existing CA and keys are kept across restarts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        openssl = ["openssl"]
        if not self.ca_crt.exists():
            self._run([*openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                       "-days", "3650", "-subj", "/CN=clover-local-ca",
                       "-keyout", str(self.ca_key), "-out", str(self.ca_crt)])
        if not self.server_crt.exists():
            csr = self.dir / "apiserver.csr"
            ext = self.dir / "apiserver.ext"
            ext.write_text(
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
                "extendedKeyUsage=serverAuth\n"
            )
            self._run([*openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
                       "-subj", "/CN=kube-apiserver", "-keyout", str(self.server_key),
                       "-out", str(csr)])
            self._run([*openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.ca_crt),
                       "-CAkey", str(self.ca_key), "-CAcreateserial", "-days", "3650",
                       "-sha256", "-extfile", str(ext), "-out", str(self.server_crt)])
        if not self.sa_key.exists():
            self._run([*openssl, "genrsa", "-out", str(self.sa_key), "2048"])
            self._run([*openssl, "rsa", "-in", str(self.sa_key), "-pubout",
                       "-out", str(self.sa_pub)])
        if not self.tokens_csv.exists():
            with open(self.tokens_csv, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow([secrets.token_hex(24), ADMIN_USER, ADMIN_USER, "system:masters"])
                writer.writerow([secrets.token_hex(24), CONTROLLER_MANAGER_USER,
                                 CONTROLLER_MANAGER_USER])
            self.tokens_csv.chmod(0o600)

    def token(self, user: str) -> str:
        with open(self.tokens_csv, newline="") as f:
            for row in csv.reader(f):
                if row[1] == user:
                    return row[0]
        raise StackError(f"no token for {user} in {self.tokens_csv}")

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_crt))

    @staticmethod
    def _run(argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str,
                     namespace: str = "default") -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "clover-local",
                      "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}@clover-local",
                      "context": {"cluster": "clover-local", "user": user,
                                  "namespace": namespace}}],
        "current-context": f"{user}@clover-local",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


class _Kubernetes(Server):
    version = install.KUBERNETES_VERSION

    @cached_property
    def bindir(self) -> Path:
        return self.paths.cache / f"kubernetes-{install.KUBERNETES_VERSION}" / "bin"

    @cached_property
    def pki(self) -> Pki:
        return Pki(self.paths.pki)

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.stack.apiserver_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.paths.kube / "admin.kubeconfig"

    def install(self) -> None:
        install.ensure_kubernetes(self.paths.cache, self.paths.logs)

    def configure(self) -> None:
        self.pki.ensure()
        write_kubeconfig(self.admin_kubeconfig, self.server_url, self.pki.ca_crt, ADMIN_USER,
                         self.pki.token(ADMIN_USER))
        write_kubeconfig(self.paths.kube / "controller-manager.kubeconfig", self.server_url,
                         self.pki.ca_crt, CONTROLLER_MANAGER_USER,
                         self.pki.token(CONTROLLER_MANAGER_USER), "kube-system")


class KubeApiserver(_Kubernetes):
    name = "kube-apiserver"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.apiserver_port,)

    def argv(self) -> list[str]:
        pki = self.pki
        return [
            str(self.bindir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.stack.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.stack.apiserver_port}", "--insecure-port=0",
            f"--tls-cert-file={pki.server_crt}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--token-auth-file={pki.tokens_csv}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            # One API server and no Service network: nothing to reconcile endpoints for.
            "--endpoint-reconciler-type=none",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--profiling=false",
        ]

    def check(self, timeout: float) -> str:
        context = self.pki.ssl_context()
        token = self.pki.token(ADMIN_USER)
        _, body = _http_json(f"{self.server_url}/readyz", timeout, token=token, context=context)
        if body.strip() != "ok":
            raise StackError(f"/readyz says {body.strip()!r}")
        _, version = _http_json(f"{self.server_url}/version", timeout, token=token,
                                context=context)
        return f"/readyz ok ({yaml.safe_load(version)['gitVersion']})"


class KubeControllerManager(_Kubernetes):
    name = "kube-controller-manager"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.controller_manager_port,)

    def configure(self) -> None:
        super().configure()
        self.paths.data(self.name).mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        kubeconfig = self.paths.kube / "controller-manager.kubeconfig"
        return [
            str(self.bindir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # Without per-controller credentials the Deployment controller may create no
            # ReplicaSets, and no revisions appear.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_crt}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.stack.controller_manager_port}",
            "--port=0",  # 1.20 also serves plain HTTP on 0.0.0.0:10252 unless told not to
            f"--cert-dir={self.paths.data(self.name)}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def check(self, timeout: float) -> str:
        # Its serving certificate is self-signed; /healthz is the documented unauthenticated
        # probe. It counts as ready only once it has created the default ServiceAccount,
        # which proves it reaches the API server with its own credentials.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{self.stack.controller_manager_port}/healthz"
        _, body = _http_json(url, timeout, context=context)
        if body.strip() != "ok":
            raise StackError(f"/healthz says {body.strip()!r}")
        apiserver = f"https://127.0.0.1:{self.stack.apiserver_port}"
        _http_json(f"{apiserver}/api/v1/namespaces/default/serviceaccounts/default", timeout,
                   token=self.pki.token(ADMIN_USER), context=self.pki.ssl_context())
        return "/healthz ok, controllers running"


def pipeline_manifests(namespace: str,
                       manifest: str = "pipeline-rbac.yaml") -> list[dict[str, Any]]:
    """k8s/manifests/<manifest> with its namespace set to the configured one."""
    text = resources.files("k8s").joinpath(f"manifests/{manifest}").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] == "Namespace":
            doc["metadata"]["name"] = namespace
        else:
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    return docs


def bootstrap_pipeline_identity(admin_kubeconfig: Path, pipeline_kubeconfig: Path, ca: Path,
                                namespace: str, service_account: str,
                                manifest: str = "pipeline-rbac.yaml") -> None:
    """Apply the pipeline's Namespace, ServiceAccount, Role and RoleBinding; write its kubeconfig.

    The kubeconfig carries a fresh TokenRequest token for the ServiceAccount, so whatever uses
    it has exactly the Role's permissions, as in a real cluster. ``manifest`` names another
    identity's file in k8s/manifests/ (e.g. rollback-rbac.yaml for the rollback agent).
    """
    from kubernetes import client, config, dynamic

    api = config.new_client_from_config(config_file=str(admin_kubeconfig))
    try:
        dyn = dynamic.DynamicClient(api)
        for doc in pipeline_manifests(namespace, manifest):
            resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            resource.server_side_apply(body=doc, name=doc["metadata"]["name"],
                                       namespace=doc["metadata"].get("namespace"),
                                       field_manager="clover-stack", force_conflicts=True)
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=PIPELINE_TOKEN_SECONDS)
        )
        issued = client.CoreV1Api(api).create_namespaced_service_account_token(
            service_account, namespace, request
        )
        if issued.status is None or not issued.status.token:
            raise StackError(f"the API server issued no token for {service_account}")
        token: str = issued.status.token
        server: str = api.configuration.host
    finally:
        api.close()
    write_kubeconfig(pipeline_kubeconfig, server, ca,
                     f"system:serviceaccount:{namespace}:{service_account}", token, namespace)
