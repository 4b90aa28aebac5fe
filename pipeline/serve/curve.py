"""CURVE keys for the ZeroMQ door: make them, load the server's, admit only known clients."""

from __future__ import annotations

import logging
import os

import zmq
import zmq.auth

from wanwu.errors import ConfigError

logger = logging.getLogger(__name__)


def make_curve_keys(folder: str, name: str = "wanwu") -> tuple[str, str]:
    """Create a CURVE key pair in ``folder`` (created if missing) as ``zmq.auth`` certificates.

    Returns:
        ``(public_file, secret_file)``: ``<name>.key`` (give it to peers; a client's goes
        into the server's clients folder) and ``<name>.key_secret`` (keep it private).
    """
    os.makedirs(folder, exist_ok=True)
    return zmq.auth.create_certificates(folder, name)


def load_server_key(path: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"expected a zmq.auth certificate file, got {path!r}: {exc}") from exc
    if not secret:
        raise ConfigError(f"expected a certificate holding a secret key (*.key_secret), got {path!r} with only "
                          "a public key")
    return public, secret


def start_authenticator(ctx: zmq.Context, clients_dir: str):
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=clients_dir)
    if not any(name.endswith(".key") for name in os.listdir(clients_dir)):
        logger.warning("no client public keys (*.key) in %r: no client will be admitted", clients_dir)
    return auth
