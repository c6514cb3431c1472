"""Hospital node keys: the ECDSA key pair that proves a SuperNode is a registered consortium member.

TLS proves to the hospital that it talks to the coordinator; the node key proves to the coordinator
that a connecting node is a hospital it registered (Flower's SuperNode authentication). The private
key never leaves the site directory; the public key (OpenSSH format, what `flwr supernode register`
reads) is sent to the coordinator out of band, and its fingerprint is read aloud on the phone to
check that nobody swapped it on the way.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vilref_fed.security.pki import PKIError, write_private, write_public

NODE_KEY_NAME = "node_key"
NODE_PUB_NAME = "node_key.pub"
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class NodeKeyPair:
    private_path: Path
    public_path: Path
    public_openssh: str
    fingerprint: str
    created: bool


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """`SHA256:...` like `ssh-keygen -lf`, so both sides can compare it with a standard tool."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load and validate an OpenSSH public key: ECDSA on a NIST curve, as Flower requires."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PKIError(f"public key file {path} not found") from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(
            f"{path} is not an OpenSSH public key; send the node_key.pub printed by `vilref-client join`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise PKIError(f"{path} is not an ECDSA key on a NIST curve (P-256/P-384/P-521)")
    return key


def public_key_openssh(key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    s = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{s} {comment}".strip()


def ensure_node_key(key_dir: Path, comment: str = "vilref-site") -> NodeKeyPair:
    """Create the site's P-384 node key pair on first use; reuse it afterwards.

    Reusing matters: the coordinator registered this exact public key, and a new key would lock the
    hospital out until the coordinator registers it again.
    """
    key_dir = Path(key_dir)
    priv = key_dir / NODE_KEY_NAME
    pub = key_dir / NODE_PUB_NAME
    created = False
    if priv.exists():
        try:
            private_key = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
        except (ValueError, UnsupportedAlgorithm):
            raise PKIError(
                f"{priv} is not a readable OpenSSH private key; move it away to create a new one"
            ) from None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{priv} is not an ECDSA key")
    else:
        private_key = ec.generate_private_key(ec.SECP384R1())
        write_private(
            priv,
            private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        created = True
    public = private_key.public_key()
    text = public_key_openssh(public, comment)
    if created or not pub.exists() or pub.read_text().split()[:2] != text.split()[:2]:
        write_public(pub, (text + "\n").encode())
    return NodeKeyPair(priv, pub, text, fingerprint(public), created)
