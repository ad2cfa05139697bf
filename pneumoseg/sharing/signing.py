"""Provenance of shared bundles: Ed25519 signatures over the checksum manifest (``cryptography``).

The sending hospital makes a key pair once (``pneumoseg bundle keygen --out KEY``: ``KEY``, private, mode
0600, and ``KEY.pub``) and gives ``KEY.pub`` to the receiving hospitals over a channel they trust; each
export is signed (``pneumoseg bundle export ... --sign KEY``). The receiving hospital pins the public keys
of its senders in a folder (:func:`default_trusted_keys_dir`, or ``--trusted-keys DIR``), one ``NAME.pub``
per sender: verify names the signer by that file name and the key's fingerprint.

A valid signature proves that the holder of that private key produced exactly this manifest, hence (with
the checksums) exactly these files. It does not prove that the sender is benign or the model any good:
that is why a received bundle is data that nothing executes, and why ``bundle evaluate`` exists.

The signed message is ``DOMAIN + manifest bytes``: a signature made for anything else (another program,
another format) does not verify as a bundle signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PASSPHRASE_ENV",
    "TRUSTED_KEYS_ENV",
    "SignatureCheck",
    "TrustedKey",
    "check_signature",
    "default_trusted_keys_dir",
    "fingerprint",
    "generate_key",
    "load_trusted_keys",
    "sign_manifest",
]

DOMAIN = b"pneumoseg bundle checksums v1\n"
SIGNATURE_FORMAT = "pneumoseg.signature"
TRUSTED_KEYS_ENV = "PNEUMOSEG_TRUSTED_KEYS"
"""Environment variable naming the trusted-keys folder (``--trusted-keys`` wins over it)."""
PASSPHRASE_ENV = "PNEUMOSEG_SIGNING_PASSPHRASE"
"""If set, ``keygen`` encrypts the private key with it and ``export --sign`` decrypts with it."""
MAX_KEY_BYTES = 16 * 1024
MAX_TRUSTED_KEYS = 1000
_SIGNATURE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["format", "version", "algorithm", "public_key_sha256", "signature"],
    "properties": {
        "format": {"const": SIGNATURE_FORMAT},
        "version": {"const": 1},
        "algorithm": {"const": "ed25519"},
        "public_key_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "signature": {"type": "string", "maxLength": 128},
    },
}


def default_trusted_keys_dir() -> Path:
    """``$PNEUMOSEG_TRUSTED_KEYS``, else ``$XDG_CONFIG_HOME/pneumoseg/trusted_keys`` (``~/.config/...``)."""
    if os.environ.get(TRUSTED_KEYS_ENV):
        return Path(os.environ[TRUSTED_KEYS_ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "pneumoseg" / "trusted_keys"


def _raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: Any) -> str:
    """SHA-256 of the raw 32-byte public key, hex (``sha256:`` + its first 16 digits is what is shown)."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def short(fingerprint_hex: str) -> str:
    return f"ed25519 sha256:{fingerprint_hex[:16]}"


@dataclass(frozen=True)
class TrustedKey:
    """A pinned public key: ``name`` is its file name without ``.pub`` (how verify names the signer)."""

    name: str
    fingerprint: str
    key: Any


# ============================================================================================ sending


def generate_key(out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key ``out`` (PEM PKCS#8, mode 0600; encrypted with ``$PNEUMOSEG_SIGNING_PASSPHRASE``
    if set) and ``out.pub`` (PEM); return both paths and the fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(out), Path(f"{out}.pub")
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (use --overwrite to replace a key: bundles signed with it will "
                                  "no longer verify for receivers who pinned the new one only)")  # fmt: skip
    key = Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, fingerprint(key.public_key())


def _private_key(path: str | os.PathLike) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"signing key not found: {path} (make one with `pneumoseg bundle keygen --out KEY`)")
    data = path.read_bytes()[:MAX_KEY_BYTES]
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:
        raise ValueError(f"{path}: the key is encrypted: set {PASSPHRASE_ENV}") from None
    except ValueError:
        raise ValueError(f"{path}: not a PEM private key (or a wrong {PASSPHRASE_ENV})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key (make one with `pneumoseg bundle keygen`)")
    return key


def sign_manifest(manifest: bytes, key_path: str | os.PathLike) -> tuple[bytes, TrustedKey]:
    """The signature file for ``manifest`` (JSON) and the signer's public key (named after the key file)."""
    key = _private_key(key_path)
    public = key.public_key()
    value = {
        "format": SIGNATURE_FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "public_key_sha256": fingerprint(public),
        "signature": base64.b64encode(key.sign(DOMAIN + manifest)).decode(),
    }
    signer = TrustedKey(Path(key_path).name, value["public_key_sha256"], public)
    return (json.dumps(value, indent=1) + "\n").encode(), signer


# ========================================================================================== receiving


def public_key_of(path: str | os.PathLike) -> TrustedKey:
    """Read one public key file: PEM (``keygen``'s ``KEY.pub``) or OpenSSH ``ssh-ed25519 ...``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    data = path.read_bytes()[:MAX_KEY_BYTES]
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except Exception as err:  # cryptography raises ValueError, TypeError or UnsupportedAlgorithm on bad input
        raise ValueError(f"{path}: not a public key ({type(err).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return TrustedKey(path.name.removesuffix(".pub"), fingerprint(key), key)


def load_trusted_keys(folder: str | os.PathLike | None = None) -> tuple[list[TrustedKey], list[str]]:
    """The ``*.pub`` keys of ``folder`` (default :func:`default_trusted_keys_dir`) and problems with files
    that are not keys (reported, never fatal: other keys still count)."""
    folder = Path(folder) if folder is not None else default_trusted_keys_dir()
    if not folder.is_dir():
        return [], [f"trusted-keys folder {folder} does not exist"]
    keys, problems = [], []
    for path in sorted(folder.glob("*.pub"))[:MAX_TRUSTED_KEYS]:
        if not path.is_file():
            continue
        try:
            keys.append(public_key_of(path))
        except (OSError, ValueError) as err:
            problems.append(str(err))
    return keys, problems


@dataclass(frozen=True)
class SignatureCheck:
    """Outcome of :func:`check_signature`: ``status`` is ``valid``, ``unsigned``, ``unknown_key``,
    ``invalid`` or ``malformed``; ``signer`` names the trusted key when it is known."""

    status: str
    detail: str
    signer: str | None = None


def check_signature(manifest: bytes, signature: bytes | None, keys: Sequence[TrustedKey],
                    keys_source: str = "the trusted keys") -> SignatureCheck:  # fmt: skip
    """Check the signature file ``signature`` of ``manifest`` against the pinned ``keys``."""
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        return SignatureCheck("unsigned", "unsigned bundle (no checksums.sha256.sig): who sent it cannot be checked")
    import jsonschema

    try:
        value = json.loads(signature.decode("utf-8"))
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_SIGNATURE_SCHEMA).iter_errors(value))
        if error is not None:
            raise ValueError(error.message[:120])
        raw = base64.b64decode(value["signature"], validate=True)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        return SignatureCheck("malformed", f"checksums.sha256.sig is not a pneumoseg signature ({str(err)[:120]})")
    claimed = value["public_key_sha256"]
    key = next((k for k in keys if k.fingerprint == claimed), None)
    if key is None:
        return SignatureCheck(
            "unknown_key",
            f"signed by an unknown key ({short(claimed)}): it is not among {keys_source}; pin the sender's public "
            "key there if you trust it",
        )
    try:
        key.key.verify(raw, DOMAIN + manifest)
    except InvalidSignature:
        return SignatureCheck(
            "invalid",
            f"the signature does not match checksums.sha256 (the manifest or the signature was changed after "
            f"{key.name} signed it)",
            key.name,
        )
    return SignatureCheck("valid", f"signed by {key.name} ({short(key.fingerprint)})", key.name)
