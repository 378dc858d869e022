"""ZeroMQ CURVE keys: named keypairs in a folder, and securing sockets with them.

A keys folder (default: the per-user config folder, ``…/rtvamp/keys``) holds ZeroMQ
certificate files, written and read by :mod:`zmq.auth`::

    server.key  server.key_secret     the worker's keypair (or any other named server's)
    client.key  client.key_secret     an engine's keypair
    authorized/NAME.key               public keys a server accepts (copies of clients' .key)

A ``.key`` file holds only a public key and may be shared; a ``.key_secret`` file holds both
halves and never leaves its machine (it is written with mode 0600). Nothing here is specific to
the generation worker: any server/client pair (the DAW bridge too) uses the same folder with its
own names. Keys are Z85 text, 40 bytes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
"""the default name of a server's keypair"""

CLIENT = "client"
"""the default name of a client's keypair"""

AUTHORIZED = "authorized"
"""sub-folder of public keys a server accepts"""


class KeysError(ValueError):
    """Missing, unreadable or malformed key files; the message says what to run or copy."""


def default_keys_dir() -> Path:
    """The per-user keys folder (platformdirs config dir ``rtvamp/keys``)."""
    return Path(platformdirs.user_config_dir("rtvamp")) / "keys"


def keys_dir(folder: str | os.PathLike | None = None) -> Path:
    """`folder`, or the default keys folder when None."""
    return default_keys_dir() if folder is None else Path(folder)


@dataclass(frozen=True)
class KeyPair:
    """A named CURVE keypair (Z85, 40 bytes each); `secret` is None for a public key alone."""

    name: str
    public: bytes
    secret: bytes | None


@dataclass(frozen=True)
class CurveKeys:
    """What one end of a CURVE connection needs.

    A server: its own keypair and the client public keys it accepts (`authorized`).
    A client: its own keypair and the server's public key (`server_public`)."""

    own: KeyPair
    server_public: bytes | None = None
    authorized: tuple[bytes, ...] = ()


def create_keypair(name: str, folder: str | os.PathLike | None = None, overwrite: bool = False) -> KeyPair:
    """Write NAME.key and NAME.key_secret (mode 0600) in the folder (created 0700) → the keypair.

    Refuses to replace an existing keypair unless `overwrite` (every peer would need the new
    public key)."""
    _check_name(name)
    folder = keys_dir(folder)
    secret_file = folder / f"{name}.key_secret"
    if secret_file.exists() and not overwrite:
        raise KeysError(f"{secret_file} exists already (pass overwrite to replace it: every peer then needs "
                        f"the new {name}.key)")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(zmq.auth.create_certificates(folder, name)[1], 0o600)
    return load_keypair(name, folder)


def load_keypair(name: str, folder: str | os.PathLike | None = None) -> KeyPair:
    """The keypair NAME from NAME.key_secret in the folder (KeysError when missing or malformed)."""
    _check_name(name)
    path = keys_dir(folder) / f"{name}.key_secret"
    public, secret = _read(path, f"create it with `rtvamp keys new {name}`, or copy it from the machine that did")
    if secret is None:
        raise KeysError(f"{path} holds no secret key (is it a renamed .key file?)")
    return KeyPair(name, public, secret)


def load_public_key(name_or_file: str | os.PathLike, folder: str | os.PathLike | None = None) -> bytes:
    """A public key from a .key file path, or from NAME.key in the folder."""
    path = Path(name_or_file)
    if path.suffix != ".key":
        _check_name(str(name_or_file))
        path = keys_dir(folder) / f"{name_or_file}.key"
    return _read(path, "copy the peer's .key file here (it is public)")[0]


def authorize(public_key_file: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Copy a client's public .key file into the folder's authorized/ sub-folder → the copy."""
    source = Path(public_key_file)
    load_public_key(source)  # refuse garbage before it is trusted
    target_dir = keys_dir(folder) / AUTHORIZED
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = target_dir / source.name
    shutil.copyfile(source, target)
    return target


def authorized_keys(folder: str | os.PathLike | None = None) -> tuple[bytes, ...]:
    """Every public key in the folder's authorized/ sub-folder (sorted by file name)."""
    directory = keys_dir(folder) / AUTHORIZED
    if not directory.is_dir():
        return ()
    return tuple(load_public_key(p) for p in sorted(directory.glob("*.key")))


def load_keys(folder: str | os.PathLike | None = None, role: str = CLIENT, name: str | None = None,
              server: str = SERVER) -> CurveKeys:
    """The keys of one end, with errors that say what is missing and how to fix it.

    role "server": keypair `name` (default "server") and the authorized client keys (at least
    one is required). role "client": keypair `name` (default "client") and the public key
    `server` (default "server.key") of the server it connects to."""
    folder = keys_dir(folder)
    if not folder.is_dir():
        raise KeysError(f"no keys folder {folder}: run `rtvamp keys` (or pass the folder that holds them)")
    if role == "server":
        own = load_keypair(name or SERVER, folder)
        authorized = authorized_keys(folder)
        if not authorized:
            raise KeysError(f"{folder / AUTHORIZED} holds no client keys, so every engine would be refused: "
                            f"`rtvamp keys authorize CLIENT.key`")
        return CurveKeys(own, authorized=authorized)
    if role == "client":
        return CurveKeys(load_keypair(name or CLIENT, folder), server_public=load_public_key(server, folder))
    raise ValueError(f"role must be 'server' or 'client', not {role!r}")


def init_keys(folder: str | os.PathLike | None = None) -> CurveKeys:
    """One folder for both ends on one machine (or to copy from): server and client keypairs
    (created when missing) with the client authorized → the client's CurveKeys."""
    folder = keys_dir(folder)
    for name in (SERVER, CLIENT):
        if not (folder / f"{name}.key_secret").exists():
            create_keypair(name, folder)
    if not (folder / AUTHORIZED / f"{CLIENT}.key").exists():
        authorize(folder / f"{CLIENT}.key", folder)
    return load_keys(folder, CLIENT)


# -- sockets ---------------------------------------------------------------------------------

def secure_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE server with `keys` (before it binds). Client keys are checked by
    a :class:`ThreadAuthenticator` started with :func:`start_authenticator` on its context."""
    socket.curve_secretkey = keys.own.secret
    socket.curve_publickey = keys.own.public
    socket.curve_server = True


def secure_client(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE client with `keys` (before it connects)."""
    if keys.server_public is None:
        raise KeysError("a CURVE client needs the server's public key")
    socket.curve_secretkey = keys.own.secret
    socket.curve_publickey = keys.own.public
    socket.curve_serverkey = keys.server_public


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """A ZAP handler on `context` that accepts exactly `keys.authorized` (stop() it when done)."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    accepted = frozenset(keys.authorized)

    class Provider:
        @staticmethod
        def callback(domain: str, key: bytes) -> bool:
            return key in accepted

    authenticator.configure_curve_callback(domain="*", credentials_provider=Provider())
    return authenticator


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
"""socket monitor events of a refused or failed security handshake"""


def handshake_failure(event: int, endpoint: str) -> str:
    """A client's explanation of a handshake failure event on `endpoint`."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"{endpoint} refused this client's key (CURVE): its public key is not in the server's "
                f"{AUTHORIZED}/ folder (`rtvamp keys authorize client.key` there)")
    return (f"the CURVE handshake with {endpoint} failed: the server's public key here (server.key) is not the "
            "server's, or the server does not use CURVE keys")


# -- endpoints -------------------------------------------------------------------------------

def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: ipc://, inproc://, and tcp:// on
    127.0.0.0/8, ::1 or localhost. A wildcard (``*``, 0.0.0.0) or any other host is not."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").split(";")[-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeysError(f"a key name is letters, digits, '-', '_' and '.', not {name!r}")


def _read(path: Path, hint: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeysError(f"no key file {path}: {hint}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{path} is not a ZeroMQ certificate file: {exc}") from None
    if public is None or len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeysError(f"{path} holds a malformed key (a key is 40 characters of Z85)")
    return public, secret
