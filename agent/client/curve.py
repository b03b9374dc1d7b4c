"""CURVE for clients: the client's key pair and the agent's public key on a socket.

Key files are pyzmq's certificate format (what `hostagent keygen` writes): NAME.key holds a
public key, NAME.key_secret both.
"""

from __future__ import annotations

import zmq
import zmq.auth


class KeyFileError(Exception):
    """A key file that cannot be used (missing, unreadable, no secret key where one is due)."""


def make_client(sock: zmq.Socket, client_key_file: str, server_key_file: str) -> None:
    """Make `sock` a CURVE client: our key pair (a .key_secret file) and the server's public
    key (its .key file). Set before connect."""
    try:
        public, secret = zmq.auth.load_certificate(client_key_file)
        server_public, _ = zmq.auth.load_certificate(server_key_file)
    except (OSError, ValueError) as exc:
        raise KeyFileError(str(exc)) from None
    if not secret:
        raise KeyFileError(f"{client_key_file} holds no secret key")
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)


