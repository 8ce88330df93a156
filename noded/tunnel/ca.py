"""The cluster's certificate authority: a self-signed root, short-lived per-service-account certificates.

Workload certificates are ECDSA P-256 leaves whose only name is a SPIFFE URI SAN
(`spiffe://<trust domain>/ns/<ns>/sa/<sa>`), usable as TLS client and server, valid from a minute before
issue (clock skew) for `ttl`. The CA signs public keys: private keys never leave the node that made them.
`Issuer` adds Istio's node restriction: a node is issued only identities of pods that run on it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from noded.files import write_private

SKEW = datetime.timedelta(minutes=1)
ROOT_VALIDITY = datetime.timedelta(days=3650)
CURVES = (ec.SECP256R1, ec.SECP384R1)  # keys the CA signs: ECDSA on these curves, or RSA of MIN_RSA bits
MIN_RSA = 2048


class NotAuthorized(Exception):
    """A node asked for an identity that does not run on it."""


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def trust_domain_of(uri: str) -> str:
    """The trust domain a SPIFFE ID (spiffe://DOMAIN/...) names."""
    return uri.removeprefix("spiffe://").split("/", 1)[0]


def parse_spiffe(uri: str) -> tuple[str, str, str]:
    """(trust domain, namespace, service account) of a workload SPIFFE ID; ValueError otherwise."""
    if not uri.startswith("spiffe://"):
        raise ValueError(f"{uri!r} is not a SPIFFE ID")
    domain, _, path = uri[len("spiffe://") :].partition("/")
    parts = path.split("/")
    if not domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa" or not parts[1] or not parts[3]:
        raise ValueError(f"{uri!r} is not a workload SPIFFE ID (spiffe://DOMAIN/ns/NS/sa/SA)")
    return domain, parts[1], parts[3]


def node_id(trust_domain: str, node: str) -> str:
    """A node's own identity, for asking the CA (never a workload: parse_spiffe refuses it)."""
    return f"spiffe://{trust_domain}/node/{node}"


def parse_node(uri: str, trust_domain: str) -> str:
    prefix = f"spiffe://{trust_domain}/node/"
    if not uri.startswith(prefix) or "/" in uri[len(prefix) :] or not uri[len(prefix) :]:
        raise ValueError(f"{uri!r} is not a node identity of {trust_domain}")
    return uri[len(prefix) :]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_root(trust_domain: str, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """(root certificate PEM, root key PEM) of a new self-signed CA for the trust domain."""
    now = now or _now()
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"noded root CA for {trust_domain}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert_pem(cert), key_pem(key)


def write_root(directory: str, trust_domain: str) -> tuple[str, str]:
    """Create a root in directory (root.pem, root-key.pem with mode 0600) unless one is there; the paths."""
    cert_path, key_path = os.path.join(directory, "root.pem"), os.path.join(directory, "root-key.pem")
    if not os.path.exists(cert_path):
        os.makedirs(directory, exist_ok=True)
        cert, key = create_root(trust_domain)
        write_private(key_path, key)
        with open(cert_path, "wb") as f:
            f.write(cert)
    return cert_path, key_path


class CertificateAuthority:
    def __init__(self, root_cert_pem: bytes, root_key_pem: bytes) -> None:
        self.root = x509.load_pem_x509_certificate(root_cert_pem)
        self.key = serialization.load_pem_private_key(root_key_pem, password=None)
        constraints = self.root.extensions.get_extension_for_class(x509.NameConstraints).value
        permitted = constraints.permitted_subtrees or []
        self.trust_domain = permitted[0].value if permitted else ""  # a URI constraint names the host part

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> CertificateAuthority:
        with open(cert_path, "rb") as c, open(key_path, "rb") as k:
            return cls(c.read(), k.read())

    def issue(
        self, identity: str, public_key_pem: bytes, ttl: datetime.timedelta, now: datetime.datetime | None = None
    ) -> bytes:
        """A workload certificate (PEM) for `identity` over the given public key."""
        domain, _namespace, _account = parse_spiffe(identity)
        return self._issue(identity, domain, public_key_pem, ttl, now)

    def issue_node(self, node: str, public_key_pem: bytes, ttl: datetime.timedelta) -> bytes:
        """A node certificate: what a node presents to the CA service to ask for its workloads'."""
        return self._issue(node_id(self.trust_domain, node), self.trust_domain, public_key_pem, ttl, None)

    def _issue(
        self,
        identity: str,
        domain: str,
        public_key_pem: bytes,
        ttl: datetime.timedelta,
        now: datetime.datetime | None,
    ) -> bytes:
        if domain != self.trust_domain:
            raise NotAuthorized(f"{identity}: not in trust domain {self.trust_domain}")
        now = now or _now()
        public_key = acceptable_key(public_key_pem)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, domain)]))
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )  # digitalSignature, keyEncipherment
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(cert)


def acceptable_key(public_key_pem: bytes):
    """The public key, if it is one the CA signs (ECDSA P-256/P-384, RSA of at least 2048 bits, as Istio's
    CA requires); NotAuthorized otherwise (an RSA-1024 key was signed before)."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError) as e:
        raise NotAuthorized(f"not a public key: {e}") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA:
        return key
    raise NotAuthorized(f"key not accepted: {type(key).__name__} {getattr(key, 'key_size', '')} bits")


def verify_issued(
    cert_pem: bytes, identity: str, public_key_pem: bytes, root_pem: bytes, now: datetime.datetime | None = None
) -> x509.Certificate:
    """What a node checks of a certificate the CA service hands back: signed by the root, naming exactly
    `identity`, over the key this node sent, valid now, not a CA. ValueError otherwise."""
    now = now or _now()
    cert = x509.load_pem_x509_certificate(cert_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    try:
        cert.verify_directly_issued_by(root)
    except Exception as e:  # InvalidSignature, ValueError, TypeError: not the root's
        raise ValueError(f"not signed by the root: {type(e).__name__} {e}") from None
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [identity] or names.get_values_for_type(x509.DNSName):
        raise ValueError(f"names {uris}, asked for {identity}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != serialization.load_pem_public_key(public_key_pem).public_bytes(*spki):
        raise ValueError("over another key than the one sent")
    if not cert.not_valid_before_utc - SKEW <= now < cert.not_valid_after_utc:
        raise ValueError(f"not valid now ({cert.not_valid_before_utc} to {cert.not_valid_after_utc})")
    if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
        raise ValueError("a CA certificate")
    return cert


@dataclass
class Issuer:
    """The CA behind Istio's node restriction: `identities_on(node)` is what runs there (from the pods)."""

    ca: CertificateAuthority
    identities_on: Callable[[str], set[str]]
    ttl: datetime.timedelta = datetime.timedelta(hours=24)

    def request(self, node: str, identity: str, public_key_pem: bytes, now: datetime.datetime | None = None) -> bytes:
        if identity not in self.identities_on(node):
            raise NotAuthorized(f"node {node} runs no pod with identity {identity}")
        return self.ca.issue(identity, public_key_pem, self.ttl, now)
