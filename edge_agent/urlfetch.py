"""A presigned URL's bytes for a download: which hosts a device may fetch from, no
redirects, and the blocking reads on a thread of their own."""

from __future__ import annotations

import queue
import threading
import urllib.parse
import urllib.request

PIECE = 16 << 10  # bytes a read returns at most: progress is seen piece by piece
_POLL_S = 0.2  # how often a reader waiting on a full queue looks at its stop flag
# What the reader hands over: the HTTP status, bytes, the error, or None at the end.
Piece = int | bytes | Exception | None


def allowed_url(url: str, hosts: frozenset[str]) -> str | None:
    """``url`` when it is http(s) on one of ``hosts`` ("host:port", lower case; the
    scheme's port when the URL names none), else None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is no number
        return None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6, as a URL writes it
    return url if host and port and f"{host}:{port}" in hosts else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None  # a redirect may name any host: followed, the allow-list means nothing


_OPENER = urllib.request.build_opener(_NoRedirect)


def _read_url(
    request: urllib.request.Request,
    timeout: float,
    out: queue.Queue[Piece],
    stop: threading.Event,
) -> None:
    """The URL reader thread: its status, then its bytes a piece at a time, then None (or
    the error) into ``out``, until ``stop``. Blocking reads (a socket timeout apiece)
    happen here, where they hold up no download."""

    def put(item: Piece) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            if not put(resp.status):
                return
            while not stop.is_set():
                piece = resp.read1(PIECE)
                if not put(piece or None) or not piece:
                    return
    except Exception as exc:  # noqa: BLE001 - handed over: the download logs it
        put(exc)


class UrlReader:
    """GETs ``url`` (a byte range) on a thread and hands over its status, then its bytes
    piece by piece: ``get`` waits at most its timeout, so a server that drips its headers
    or body holds up no caller, which keeps its own deadline."""

    def __init__(self, url: str, *, first_byte: int, last_byte: int, timeout_s: float) -> None:
        request = urllib.request.Request(url, headers={"Range": f"bytes={first_byte}-{last_byte}"})
        self._pieces: queue.Queue[Piece] = queue.Queue(maxsize=64)  # at most ~1 MiB held
        self._stop = threading.Event()
        threading.Thread(
            target=_read_url,
            args=(request, timeout_s, self._pieces, self._stop),
            name="edge-url-reader",
            daemon=True,
        ).start()

    def get(self, timeout: float) -> Piece:
        """What came next; queue.Empty when nothing did within ``timeout``."""
        return self._pieces.get(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
