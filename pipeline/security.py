"""Who may talk to a run: loopback endpoints are open to this host's own processes; anything reachable
from elsewhere needs CurveZMQ, and then only the client keys listed in the key folder get in (ZAP).

Key folder (made by `tools/keys.py --out DIR`, in the layout pyzmq's `zmq.auth` reads):

    DIR/server.key, DIR/server.key_secret    the pipeline's key pair (the secret never leaves this host)
    DIR/clients/NAME.key                     the allow-list: public keys of the clients let in
    DIR/client-NAME/                         what one client host needs: client.key, client.key_secret
                                             and server.key (the server's public key)

Revoking a client is deleting its `clients/NAME.key` (read when a run starts). The run's own console is
client `console`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("sweepstream")

SERVER = "server"
ALLOW_LIST = "clients"
CLIENT = "client"
CONSOLE = "console"
ZAP_DOMAIN = "sweepstream"
LOCAL_TRANSPORTS = ("ipc://", "inproc://")
# Handshakes the server side refuses: no Curve (mechanism mismatch), a wrong server key, an unlisted key.
REFUSED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class KeyFolderError(ValueError):
    """A key folder that is missing or not in the layout above."""


def bind_host(endpoint: str) -> str | None:
    """The host part of an endpoint ("*" for a wildcard), None for transports that never leave this host
    (ipc, inproc)."""
    if endpoint.startswith(LOCAL_TRANSPORTS):
        return None
    return urlsplit(endpoint).hostname or "*"


def is_loopback(endpoint: str) -> bool:
    """Whether binding `endpoint` keeps it on this host: ipc/inproc, or a loopback address. A wildcard, an
    interface name, any other address or transport is taken as reachable from elsewhere."""
    host = bind_host(endpoint)
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_keys(out: Path, clients: list[str]) -> list[Path]:
    """A server key pair and one key pair per client, in the folder layout above; returns the client
    folders. Secrets are readable by their owner only."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    allow = out / ALLOW_LIST
    allow.mkdir(exist_ok=True, mode=0o700)
    server_public, server_secret = zmq.auth.create_certificates(str(out), SERVER)
    Path(server_secret).chmod(0o600)
    folders = []
    for name in clients:
        folder = out / f"{CLIENT}-{name}"
        folder.mkdir(exist_ok=True, mode=0o700)
        public, secret = zmq.auth.create_certificates(str(folder), CLIENT)
        Path(secret).chmod(0o600)
        shutil.copyfile(server_public, folder / f"{SERVER}.key")
        shutil.copyfile(public, allow / f"{name}.key")
        folders.append(folder)
    return folders


@dataclass(frozen=True)
class ClientKeys:
    """One client's pair and the server's public key: what a Curve client socket needs."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, folder: str | Path) -> ClientKeys:
        folder = Path(folder)
        secret_file, server_file = folder / f"{CLIENT}.key_secret", folder / f"{SERVER}.key"
        if (folder / f"{SERVER}.key_secret").is_file() and not secret_file.is_file():
            raise KeyFolderError(f"{folder} is a server key folder; give one of its client folders "
                            f"({folder}/{CLIENT}-NAME)")
        for needed in (secret_file, server_file):
            if not needed.is_file():
                raise KeyFolderError(f"{folder}: no {needed.name} (make keys with tools/keys.py --out DIR "
                                     f"and give a DIR/{CLIENT}-NAME folder)")
        try:
            public, secret = zmq.auth.load_certificate(str(secret_file))
            server, _ = zmq.auth.load_certificate(str(server_file))
        except (OSError, ValueError) as exc:
            raise KeyFolderError(f"{folder}: unreadable key file: {exc}") from None
        if secret is None:
            raise KeyFolderError(f"{secret_file}: holds no secret key")
        return cls(public, secret, server)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a Curve client of the server (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def check_server_keys(folder: str | Path) -> None:
    """A server key folder as the run needs it, or one clear error (checked before anything starts)."""
    folder = Path(folder)
    if not (folder / f"{SERVER}.key_secret").is_file():
        raise KeyFolderError(f"{folder} has no {SERVER}.key_secret (make one with tools/keys.py "
                             f"--out {folder})")
    if not any((folder / ALLOW_LIST).glob("*.key")):
        raise KeyFolderError(f"{folder}/{ALLOW_LIST} lists no client keys, so no client could connect")
    try:
        zmq.auth.load_certificate(str(folder / f"{SERVER}.key_secret"))
    except (OSError, ValueError) as exc:
        raise KeyFolderError(f"{folder}/{SERVER}.key_secret: unreadable: {exc}") from None


def console_keys(folder: str | Path) -> ClientKeys | None:
    """The run's own console client (DIR/client-console), if the key folder has one."""
    path = Path(folder) / f"{CLIENT}-{CONSOLE}"
    return ClientKeys.load(path) if path.is_dir() else None


class ServerSecurity:
    """The server side of one process: a ZAP authenticator that lets in only the listed client keys, Curve
    on the sockets it is asked to secure, and a count of the peers whose handshake was refused (from each
    secured socket's monitor). Without keys, `secure` leaves a socket as it is (loopback only)."""

    def __init__(self, context: zmq.Context, key_folder: str | None) -> None:
        self.refused = 0
        self._monitors: list[zmq.Socket] = []
        self._auth: ThreadAuthenticator | None = None
        self._secret: bytes | None = None
        self._public: bytes | None = None
        if key_folder is None:
            return
        self._public, self._secret = zmq.auth.load_certificate(str(Path(key_folder) / f"{SERVER}.key_secret"))
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("sweepstream.zap"))
        self._auth.start()
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(Path(key_folder) / ALLOW_LIST))

    @property
    def enabled(self) -> bool:
        return self._auth is not None

    def secure(self, sock: zmq.Socket) -> None:
        """Curve server with ZAP on the endpoints `sock` binds from now on (libzmq takes the mechanism
        options at bind time, so a socket may keep an ipc endpoint bound before without them)."""
        if self._auth is None:
            return
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.zap_domain = ZAP_DOMAIN.encode()
        self._monitors.append(sock.get_monitor_socket(REFUSED_EVENTS))

    def count_refused(self) -> int:
        """Refused handshakes so far (reads what the monitors have waiting; never blocks)."""
        for monitor in self._monitors:
            while monitor.poll(0):
                event = recv_monitor_message(monitor)
                self.refused += 1
                if self.refused <= 10 or self.refused % 1000 == 0:
                    log.warning("refused a peer on %s: handshake failed (%s, %d so far)",
                                event["endpoint"].decode(errors="replace"), _event_name(event["event"]),
                                self.refused)
        return self.refused

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def _event_name(event: int) -> str:
    return {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key not listed",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "no Curve or wrong server key",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail"}.get(event, str(event))


def main(argv: list[str] | None = None) -> int:
    """The `sweepstream-keys` command: a server key pair and client key pairs in --out DIR."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR", help="key folder to make (or add clients to)")
    parser.add_argument("--clients", default="worker-1,worker-2,listener", metavar="NAMES",
                        help="comma-separated client names (default %(default)s); the run's own console "
                        f"client '{CONSOLE}' is always made")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.clients.split(",") if name.strip()]
    bad = [name for name in names if not name.replace("-", "").replace("_", "").isalnum()]
    if bad:
        print(f"keys: --clients: {bad[0]!r} is not a name (letters, digits, - and _)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if (out / f"{SERVER}.key_secret").exists():
        print(f"keys: --out {out} already holds a server key; choose another folder", file=sys.stderr)
        return 2
    try:
        folders = make_keys(out, [CONSOLE, *dict.fromkeys(n for n in names if n != CONSOLE)])
    except OSError as exc:
        print(f"keys: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"server key pair: {out}/{SERVER}.key (public), {out}/{SERVER}.key_secret (stays here)")
    print(f"allow-list: {out}/{ALLOW_LIST}/ ({len(folders)} client keys; delete one to revoke it)")
    for folder in folders:
        print(f"client: {folder}/ (copy to the client host; --curve-keys {folder})")
    print(f"run with: --set transport.curve_keys={out}")
    return 0
