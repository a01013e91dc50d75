"""A TLS server on a spare loopback port that records what a client shows it: the
handshake (TLS version, SNI, the client certificate, or why the handshake failed, e.g. the
client refused our certificate) and the credentials it presents afterwards, in the
client's own protocol (PostgreSQL, Redis, HTTP for S3 and MLflow). A test CA, made here with
``cryptography``, signs its certificate; a second CA lets a test show that a client given
the wrong CA refuses to talk."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# --- a test CA ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)  # libpq refuses a client key others may read


class TestCA:
    """A CA in ``directory`` (``ca_file``); ``issue`` signs server or client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "edgeloop test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, cn: str, *, hosts: tuple[str, ...] = (), client: bool = False
    ) -> tuple[Path, Path]:
        """(certificate file, key file) for ``cn``, valid for ``hosts`` (names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = cn.replace(" ", "-")
        cert_file, key_file = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_file)
        return cert_file, key_file


# --- what one connection showed ----------------------------------------------------------


@dataclass
class Seen:
    """One client connection as the server saw it."""

    tls_version: str | None = None
    sni: str | None = None
    client_cert_cn: str | None = None
    handshake_error: str | None = None  # e.g. the client refused our certificate
    credentials: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) or command


# speak(raw socket, what it showed, tls): the protocol; tls(raw) does the handshake.
Speak = Callable[[socket.socket, Seen, Callable[[socket.socket], ssl.SSLSocket]], None]


class TLSRecorder:
    """Serves ``speak`` on 127.0.0.1:``port`` with a certificate for localhost and
    127.0.0.1 signed by ``ca``; asks for (but does not require) a client certificate of the
    same CA. ``seen`` lists the connections in the order they came."""

    def __init__(self, ca: TestCA, speak: Speak) -> None:
        cert, key = ca.issue("recorder", hosts=("localhost", "127.0.0.1"))
        self._tls = threading.local()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca.ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = self._sni
        self.context = ctx
        self.speak = speak
        self.seen: list[Seen] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []

    def _sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self._tls.sni = name

    def _handshake(self, raw: socket.socket, seen: Seen) -> ssl.SSLSocket:
        self._tls.sni = None
        tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self._open.append(tls)  # wrap_socket took over raw's descriptor
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            seen.handshake_error = str(exc)
            raise
        finally:
            seen.sni = self._tls.sni
        seen.tls_version = tls.version()
        peer = tls.getpeercert()
        if peer:
            seen.client_cert_cn = dict(x[0] for x in peer["subject"]).get("commonName")
        return tls

    def __enter__(self) -> TLSRecorder:
        self._server.listen(16)
        self._server.settimeout(0.2)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for raw in self._open:  # a client's kept-alive connection ends now, not at its timeout
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen = Seen()
            self.seen.append(seen)
            self._open.append(raw)
            t = threading.Thread(target=self._serve, args=(raw, seen), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket, seen: Seen) -> None:
        raw.settimeout(10)
        with contextlib.suppress(OSError, ssl.SSLError, ValueError), raw:
            self.speak(raw, seen, lambda sock: self._handshake(sock, seen))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


# --- PostgreSQL --------------------------------------------------------------------------

SSL_REQUEST = 80877103  # the SSLRequest code (PostgreSQL protocol, 53.2.10)
GSSENC_REQUEST = 80877104


def postgres(raw: socket.socket, seen: Seen, tls: Callable[[socket.socket], ssl.SSLSocket]) -> None:
    """Answer an SSLRequest with 'S', take the TLS handshake, record the StartupMessage's
    user and database, then refuse with an ErrorResponse (28000) that names the recorder."""
    length, code = struct.unpack("!ii", _read_exactly(raw, 8))
    if code == GSSENC_REQUEST:  # libpq asks for GSS encryption first where it has Kerberos
        raw.sendall(b"N")
        length, code = struct.unpack("!ii", _read_exactly(raw, 8))
    seen.requests.append(("SSLRequest" if code == SSL_REQUEST else f"code {code}", ""))
    if code != SSL_REQUEST:
        return
    raw.sendall(b"S")
    sock = tls(raw)
    (length,) = struct.unpack("!i", _read_exactly(sock, 4))
    body = _read_exactly(sock, length - 4)[4:]  # after the protocol version
    fields = body.rstrip(b"\0").split(b"\0")
    seen.credentials = {
        k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=False)
    }
    msg = b"SFATAL\0C28000\0Mrecorded by the test's TLS recorder\0\0"
    sock.sendall(b"E" + struct.pack("!i", len(msg) + 4) + msg)


def silent(raw: socket.socket, seen: Seen, _tls: Callable) -> None:
    """Takes the connection and never answers (for connect timeouts): reads until the
    client gives up."""
    with contextlib.suppress(OSError):
        while raw.recv(4096):
            pass


# --- Redis ----------------------------------------------------------------------------


def _resp_command(sock: ssl.SSLSocket, buf: bytearray) -> list[str] | None:
    """One RESP array of bulk strings from ``sock`` (None: the client closed)."""

    def line() -> bytes:
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("client closed")
            buf.extend(chunk)
        i = buf.index(b"\r\n")
        out = bytes(buf[:i])
        del buf[: i + 2]
        return out

    try:
        head = line()
        args = []
        for _ in range(int(head[1:])):
            size = int(line()[1:])
            while len(buf) < size + 2:
                buf.extend(sock.recv(4096))
            args.append(bytes(buf[:size]).decode())
            del buf[: size + 2]
        return args
    except ConnectionError:
        return None


def redis(raw: socket.socket, seen: Seen, tls: Callable[[socket.socket], ssl.SSLSocket]) -> None:
    """TLS, then RESP: record the username and password of AUTH (or of HELLO's AUTH, as
    redis-py 8 sends) and every command's name; answer PING with PONG, anything else OK."""
    sock = tls(raw)
    buf = bytearray()
    while (cmd := _resp_command(sock, buf)) is not None:
        name = cmd[0].upper()
        seen.requests.append((name, " ".join(cmd[1:2]) if name != "AUTH" else ""))
        if name == "AUTH":
            user, password = cmd[1:] if len(cmd) == 3 else ("default", cmd[1])
            seen.credentials = {"username": user, "password": password}
        upper = [a.upper() for a in cmd]
        if name == "HELLO" and "AUTH" in upper:  # HELLO 3 AUTH user password (RESP3)
            i = upper.index("AUTH")
            seen.credentials = {"username": cmd[i + 1], "password": cmd[i + 2]}
        sock.sendall(b"+PONG\r\n" if name == "PING" else b"+OK\r\n")


def redis_silent(
    raw: socket.socket, seen: Seen, tls: Callable[[socket.socket], ssl.SSLSocket]
) -> None:
    """TLS, then reads commands and never answers (for socket timeouts)."""
    sock = tls(raw)
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


# --- HTTP (S3, MLflow) -------------------------------------------------------------------

# answer(method, path, headers) -> (status, extra headers, body)
Answer = Callable[[str, str, dict[str, str]], tuple[int, dict[str, str], bytes]]


def http(answer: Answer, *, delay_s: float = 0.0) -> Speak:
    """TLS, then HTTP/1.1 requests (kept alive): record each one's method, path and the
    Authorization header (Basic decoded to username/password, Bearer to token, AWS SigV4 to
    its access key and region); ``answer`` says what to send back, after ``delay_s``."""

    def speak(
        raw: socket.socket, seen: Seen, tls: Callable[[socket.socket], ssl.SSLSocket]
    ) -> None:
        sock = tls(raw)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
            size = int(headers.get("content-length", 0))
            while len(buf) < size:
                buf += sock.recv(65536)
            buf = buf[size:]
            seen.requests.append((method, path))
            seen.credentials.update(_authorization(headers.get("authorization", "")))
            time.sleep(delay_s)
            status, extra, body = answer(method, path, headers)
            out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
            out += [f"{k}: {v}" for k, v in extra.items()]
            sock.sendall(("\r\n".join(out) + "\r\n\r\n").encode() + body)

    return speak


def _authorization(value: str) -> dict[str, str]:
    scheme, _, rest = value.partition(" ")
    if scheme == "Basic":
        user, _, password = base64.b64decode(rest).decode().partition(":")
        return {"username": user, "password": password}
    if scheme == "Bearer":
        return {"token": rest}
    if scheme == "AWS4-HMAC-SHA256":  # Credential=KEY/date/region/s3/aws4_request, ...
        credential = rest.split("Credential=", 1)[1].split(",", 1)[0]
        key, _date, region, *_ = credential.split("/")
        return {"access_key": key, "region": region}
    return {"authorization": value} if value else {}
