"""A target's resumable download over MQTT: ask for chunks a window at a time, check each
one's hash, keep what arrived on disk so a restart asks again from the first missing chunk.

The transfer knows nothing of what the bytes are (a package, or the delta issue's delta):
it fills ``<sha256>.part`` under its directory, chunk ``k`` at ``k × chunk_size``, and
appends ``k sha256 size`` to ``<sha256>.held`` once the chunk's bytes are fsynced. At
start-up every held chunk is hashed again against the partial file, so a record line that
outlived its data (a power cut between the two fsyncs) costs one chunk, never a corrupt
download. The per-chunk hash is transport integrity, not trust: TUF checks the whole
target's signed length and hash when ``chunks()`` has yielded it.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_agent.urlfetch import UrlReader
from shared.messages import ChunkRequest, UpdateChunk
from shared.trust import UpdateRefused

log = logging.getLogger(__name__)
MAX_REQUEST_CHUNKS = 64  # ChunkRequest.count's bound
_POLL_S = 0.2  # how often a waiting download looks at the clock and its cancel flag


class TransferCancelled(Exception):
    """A newer offer superseded this download; its partial file stays for later."""


class Download:
    """One target's chunks: ``deliver`` (any thread) hands a chunk over; ``chunks()`` (the
    updater thread) stores them, asks for more, and yields the bytes in order."""

    def __init__(
        self,
        *,
        directory: Path,
        target: str,
        sha256: str,
        length: int,
        chunk_size: int,
        request: Callable[[int, int], bool],
        window: int = 8,
        retry_s: float = 3.0,
        stall_s: float = 120.0,
        release: int = 0,
        url: str | None = None,
        url_timeout_s: float = 20.0,
        url_deadline_s: float = 600.0,
        online: Callable[[], bool] = lambda: True,
    ) -> None:
        if length < 1 or chunk_size < 1:
            raise ValueError("a download needs a length and a chunk size of at least 1")
        self.target, self.sha256, self.release = target, sha256, release
        self.length, self.chunk_size = length, chunk_size
        self.n_chunks = -(-length // chunk_size)
        self.request = request
        self.window = max(1, min(window, MAX_REQUEST_CHUNKS))
        self.retry_s, self.stall_s = retry_s, stall_s
        self.online = online  # the stall clock runs only while the link is up
        # A presigned object-store URL, where this device can reach the store: tried first,
        # and what it does not deliver comes over MQTT.
        self.url = url if url and url.startswith(("https://", "http://")) else None
        self.url_timeout_s, self.url_deadline_s = url_timeout_s, url_deadline_s
        self.part = Path(directory) / f"{sha256}.part"
        self.record = Path(directory) / f"{sha256}.held"
        self.part.parent.mkdir(parents=True, exist_ok=True)
        # Bounded: a flood of chunks is dropped here and asked for again, never buffered.
        self._inbox: queue.Queue[UpdateChunk] = queue.Queue(maxsize=4 * MAX_REQUEST_CHUNKS)
        self._cancelled = threading.Event()
        self.held: dict[int, int] = self._resume()  # chunk index → its size
        self.requests: list[tuple[int, int]] = []  # (first, count) asked, for logs and tests
        self.refused = 0  # chunks dropped for a bad hash, size or index
        self._asked_until = 0  # chunks below this were asked for since the last timeout
        self._asked_at = float("-inf")

    # -- the network side --------------------------------------------------------------------
    def deliver(self, chunk: UpdateChunk) -> None:
        """Hand a chunk over (paho's network thread): no decoding, hashing or disk I/O here."""
        if chunk.target != self.target:
            return
        try:
            self._inbox.put_nowait(chunk)
        except queue.Full:
            log.debug("chunk %d of %s dropped: inbox full", chunk.index, self.target)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def first_missing(self, start: int = 0) -> int:
        """The first chunk at or after ``start`` not yet held (``n_chunks`` when none)."""
        k = start
        while k in self.held:
            k += 1
        return k

    # -- the updater side --------------------------------------------------------------------
    def chunks(self) -> Iterator[bytes]:
        """The target's bytes, chunk by chunk in order, blocking while they arrive.

        Raises UpdateRefused("transfer_failed") when no new chunk arrived for ``stall_s``
        while the link was up (what is held stays for the next offer); TransferCancelled
        on ``cancel()``. Offline, it waits: a newer offer or ``cancel()`` ends the wait.
        """
        if self.url is not None:
            self._fetch_url(self.url)
        progress_at = time.monotonic()
        self._asked_until, self._asked_at = 0, float("-inf")  # a new pass asks afresh
        for index in range(self.n_chunks):
            while index not in self.held:
                now = time.monotonic()
                if self._cancelled.is_set():
                    raise TransferCancelled(self.target)
                if not self.online():
                    progress_at = now
                if now - progress_at > self.stall_s:
                    raise UpdateRefused(
                        f"no chunk of {self.target} for {self.stall_s:.0f} s; held "
                        f"{len(self.held)} of {self.n_chunks}",
                        reason="transfer_failed",
                    )
                self._ask(index, now)
                try:
                    chunk = self._inbox.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if self._store(chunk):
                    progress_at = self._asked_at = time.monotonic()
            yield self._read(index)

    def discard(self) -> None:
        """Forget the partial download (installed, or its bytes failed TUF's check)."""
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)

    def _ask(self, index: int, now: float) -> None:
        """Keep about a window of chunks asked for ahead of ``index``; after ``retry_s``
        with nothing new, ask again from the first missing chunk."""
        frontier = self.first_missing(index)
        if now - self._asked_at > self.retry_s:
            self._asked_until = frontier  # a request or its chunks were lost: ask again
        outstanding = sum(1 for k in range(frontier, self._asked_until) if k not in self.held)
        if outstanding > self.window // 2:
            return
        first = self.first_missing(max(frontier, self._asked_until))
        count = 0
        while (
            count < self.window - outstanding
            and first + count < self.n_chunks
            and first + count not in self.held
        ):
            count += 1  # one contiguous run of missing chunks: a request is a range
        if count == 0:
            return
        if self.request(first, count):
            self.requests.append((first, count))
            self._asked_until = first + count
            self._asked_at = now
        else:
            self._asked_at = now  # offline: try again after retry_s

    def _expected_size(self, index: int) -> int:
        if index == self.n_chunks - 1:
            return self.length - index * self.chunk_size
        return self.chunk_size

    def _store(self, chunk: UpdateChunk) -> bool:
        """Check a chunk and make it durable; False when it is refused or already held."""
        index = chunk.index
        if index >= self.n_chunks or index in self.held:
            return False
        try:
            data = binascii.a2b_base64(chunk.data, strict_mode=True)
        except ValueError:
            data = b""
        if len(data) != self._expected_size(index) or (
            hashlib.sha256(data).hexdigest() != chunk.sha256
        ):
            self.refused += 1
            log.warning("chunk %d of %s refused: bad size or hash", index, self.target)
            return False
        self._write(index, data, chunk.sha256)
        return True

    def _fetch_url(self, url: str) -> None:
        """Fill the missing chunks from ``url`` in order (an HTTP range from the first one
        missing). A reader thread does the blocking reads, so a server that drips bytes
        holds nothing: this gives up past ``url_deadline_s`` in all, after ``url_timeout_s``
        without a whole chunk, on ``cancel()`` or on any error, and MQTT brings the rest."""
        start = self.first_missing()
        if start >= self.n_chunks:
            return
        reader = UrlReader(
            url,
            first_byte=start * self.chunk_size,
            last_byte=self.length - 1,
            timeout_s=self.url_timeout_s,
        )
        index, buf, why = start, bytearray(), "it ended early"
        deadline = progress_at = time.monotonic()
        deadline += self.url_deadline_s
        try:
            while index < self.n_chunks and not self._cancelled.is_set():
                now = time.monotonic()
                if now > deadline or now - progress_at > self.url_timeout_s:
                    why = "past its deadline" if now > deadline else "stalled"
                    break
                try:
                    item = reader.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is None or isinstance(item, Exception):
                    why = str(item or why)
                    break
                if isinstance(item, int):  # the status: not 206, the whole object came
                    index = start if item == 206 else 0
                    continue
                buf += item
                while index < self.n_chunks and len(buf) >= self._expected_size(index):
                    data = bytes(buf[: self._expected_size(index)])
                    del buf[: len(data)]
                    if index not in self.held:
                        self._write(index, data, hashlib.sha256(data).hexdigest())
                    index, progress_at = index + 1, time.monotonic()
        finally:
            reader.close()  # the reader thread stops at its next piece
        if index < self.n_chunks and not self._cancelled.is_set():
            log.warning(
                "%s: the URL gave chunks %d-%d, then %s; the rest over MQTT",
                self.target,
                start,
                index - 1,
                why,
            )

    def _write(self, index: int, data: bytes, digest: str) -> None:
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, index * self.chunk_size)
            os.fdatasync(fd)  # the bytes before the record that says they are there
        finally:
            os.close(fd)
        with open(self.record, "a") as fh:
            fh.write(f"{index} {digest} {len(data)}\n")
            fh.flush()
            os.fdatasync(fh.fileno())
        self.held[index] = len(data)

    def _read(self, index: int) -> bytes:
        with open(self.part, "rb") as fh:
            fh.seek(index * self.chunk_size)
            return fh.read(self.held[index])

    def _header(self) -> str:
        return json.dumps(
            {"target": self.target, "length": self.length, "chunk_size": self.chunk_size},
            sort_keys=True,
        )

    def _resume(self) -> dict[int, int]:
        """The chunks a previous run left that still hash right; a fresh record otherwise."""
        held: dict[int, int] = {}
        try:
            header, *lines = self.record.read_text().splitlines()
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            header, lines = "", []
        if header != self._header():  # another layout of the same target: start over
            self.discard()
            with open(self.record, "w") as fh:
                fh.write(self._header() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return held
        try:
            with open(self.part, "rb") as fh:
                for line in lines:
                    parts = line.split()
                    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
                        continue  # a line torn by a power cut
                    index, digest, size = int(parts[0]), parts[1], int(parts[2])
                    if index >= self.n_chunks or size != self._expected_size(index):
                        continue
                    fh.seek(index * self.chunk_size)
                    if hashlib.sha256(fh.read(size)).hexdigest() == digest:
                        held[index] = size
        except FileNotFoundError:
            pass
        if held:
            log.info("resuming %s: %d of %d chunks held", self.target, len(held), self.n_chunks)
        return held


class Transfers:
    """The device's downloads: at most one at a time, routed chunks, ChunkRequests sent
    through ``send`` (QoS 1, not buffered: a download asks again when chunks do not come)."""

    def __init__(
        self,
        directory: Path,
        *,
        fleet: str,
        device_id: str,
        send: Callable[[ChunkRequest], bool],
        window: int = 8,
        retry_s: float = 3.0,
        stall_s: float = 120.0,
        url_timeout_s: float = 20.0,
        url_deadline_s: float = 600.0,
        online: Callable[[], bool] = lambda: True,
    ) -> None:
        self.directory = Path(directory)
        self.fleet, self.device_id = fleet, device_id
        self.send = send
        self.window, self.retry_s, self.stall_s = window, retry_s, stall_s
        self.url_timeout_s, self.url_deadline_s = url_timeout_s, url_deadline_s
        self.online = online
        self.current: Download | None = None

    def begin(
        self,
        *,
        target: str,
        release: int,
        sha256: str,
        length: int,
        chunk_size: int,
        url: str | None = None,
    ) -> Download:
        """The download of a target (resumed where a previous one stopped); partial files
        of any other target are removed, so at most one target's bytes wait on disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.iterdir():
            if stale.suffix in (".part", ".held") and stale.stem != sha256:
                stale.unlink(missing_ok=True)

        def request(first: int, count: int) -> bool:
            return self.send(
                ChunkRequest(
                    fleet=self.fleet,
                    device_id=self.device_id,
                    target=target,
                    release=release,
                    first=first,
                    count=count,
                )
            )

        download = Download(
            directory=self.directory,
            target=target,
            sha256=sha256,
            length=length,
            chunk_size=chunk_size,
            request=request,
            window=self.window,
            retry_s=self.retry_s,
            stall_s=self.stall_s,
            release=release,
            url=url,
            url_timeout_s=self.url_timeout_s,
            url_deadline_s=self.url_deadline_s,
            online=self.online,
        )
        self.current = download
        return download

    def deliver(self, chunk: UpdateChunk) -> None:
        """A chunk from the broker (paho's thread): to the download it belongs to, if any."""
        current = self.current
        if current is not None:
            current.deliver(chunk)

    def end(self, download: Download) -> None:
        if self.current is download:
            self.current = None
