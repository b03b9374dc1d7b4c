"""CURVE authentication for the RPC and events sockets, with our own ZAP handler.

With `[security]` set, both sockets are CURVE servers with ZAP domain "hostagent" and
ZAP_ENFORCE_DOMAIN on, and the supervisor's loop answers ZAP requests (RFC 27) itself:
only CURVE clients whose public key is in `authorized_keys_dir` are admitted. A NULL
client, an unknown key and raw TCP all fail the handshake.

Why our own handler: a CURVE server with no ZAP handler accepts ANY client key (libzmq
only checks that the client knows the server's public key). The handler must be bound
(inproc://zeromq.zap.01) before the first connection, and answered promptly, so it lives
in the loop like every other socket. Keys are read at start-up; restart to reload them.

Key files are pyzmq's certificate format (`hostagent keygen`, zmq.auth.create_certificates):
NAME.key holds a public key, NAME.key_secret both.
"""

from __future__ import annotations

import os
import stat

import zmq
import zmq.auth
from zmq.utils import z85

ZAP_DOMAIN = "hostagent"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class ConfigError(Exception):
    pass


def _owned_safely(path: str, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"security: {path} is owned by uid {st.st_uid}, neither us nor root")


def check_modes(secret_key_file: str, authorized_keys_dir: str) -> None:
    """Refuse to start with secrets others can read or keys others can plant, naming the
    file, as ssh does (StrictModes): the server's secret key must be neither group- nor
    world-accessible; the authorized keys' directory and every key in it must not be
    group- or world-writable; all owned by us or root."""
    try:
        st = os.stat(secret_key_file)
        _owned_safely(secret_key_file, st)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"security: {secret_key_file} is accessible by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be 0600: chmod 600 {secret_key_file}")
        st = os.stat(authorized_keys_dir)
        _owned_safely(authorized_keys_dir, st)
        if st.st_mode & 0o022:
            raise ConfigError(
                f"security: {authorized_keys_dir} is writable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), so anyone could authorize a key: "
                f"chmod go-w {authorized_keys_dir}")
        for name in sorted(os.listdir(authorized_keys_dir)):
            path = os.path.join(authorized_keys_dir, name)
            if name.endswith(".key"):
                st = os.stat(path)
                _owned_safely(path, st)
                if st.st_mode & 0o022:
                    raise ConfigError(f"security: {path} is writable by others (mode "
                                      f"{stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}")
    except OSError as exc:
        raise ConfigError(f"security: {exc}") from None


def load_authorized(directory: str) -> set[bytes]:
    """The authorized clients' public keys, raw (32 bytes): what ZAP requests carry, where
    certificate files hold them z85-encoded."""
    keys = set()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".key"):
            public, _ = zmq.auth.load_certificate(os.path.join(directory, name))
            keys.add(z85.decode(public))
    return keys


class Guard:
    """The server's keys and the ZAP handler; `protect` a socket before binding it."""

    def __init__(self, ctx: zmq.Context, secret_key_file: str, authorized_keys_dir: str):
        check_modes(secret_key_file, authorized_keys_dir)
        try:
            self.public, self.secret = zmq.auth.load_certificate(secret_key_file)
            self.authorized = load_authorized(authorized_keys_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security: {exc}") from None
        if not self.secret:
            raise ConfigError(f"security: {secret_key_file} holds no secret key")
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.denied = 0

    def protect(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def answer(self) -> None:
        """Answer every pending ZAP request (RFC 27)."""
        while True:
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id, domain, _address, _identity, mechanism, *creds = \
                frames + [b""] * (7 - len(frames))
            ok = (version == b"1.0" and domain == ZAP_DOMAIN.encode()
                  and mechanism == b"CURVE" and len(creds) == 1 and creds[0] in self.authorized)
            if not ok:
                self.denied += 1
            self.zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                     b"OK" if ok else b"not authorized",
                                     z85.encode(creds[0]) if ok else b"", b""])


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (0600) in `directory`."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    return public, secret
