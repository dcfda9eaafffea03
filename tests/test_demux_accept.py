"""demux.accept.SniffingListener on real loopback sockets, under asyncio and uvloop.

Each test runs on both event loops (the appliance runs uvloop). The consumer hands the
sniffed socket to a real transport (TLS for TLS streams) and answers with what it was
told and the first line it read, so every test also checks the sniffed bytes were left
unread and a PROXY header was consumed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import resource
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from appliance.tls.devcert import ensure_dev_certificate
from demux.accept import Sniffed, SniffingListener
from demux.proxy import TrustedProxies
from demux.sniff import StreamKind

STUN_REQUEST = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"abcdefghijkl"  # Binding, no attributes
PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


class CountingSelectorLoop(asyncio.SelectorEventLoop):
    """Counts reader registrations: a sniff that spun on a readable socket would make thousands."""

    readers_added = 0

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        self.readers_added += 1
        super().add_reader(fd, callback, *args)


class CountingUvLoop(uvloop.Loop):  # type: ignore[misc]
    readers_added = 0

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        self.readers_added += 1
        super().add_reader(fd, callback, *args)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": CountingSelectorLoop,
    "uvloop": CountingUvLoop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(main(), 20)

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            loop_runner.run(bounded())

    return runner


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key, _ = ensure_dev_certificate(Path(tmp_path_factory.mktemp("demux-tls")))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


class Harness:
    """A SniffingListener on 127.0.0.1 whose consumer answers
    "KIND client-host client-port proxied\\n" and echoes the first line it read."""

    def __init__(
        self,
        server_tls: ssl.SSLContext | None = None,
        trusted: tuple[str, ...] = (),
        deadline_s: float = 0.5,
        max_pending: int = 16,
        on_stream: Callable[[Sniffed], Awaitable[None]] | None = None,
    ) -> None:
        self.server_tls = server_tls
        self.counts: collections.Counter[str] = collections.Counter()
        self.streams: list[Sniffed] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.listener = SniffingListener(
            self.sock,
            on_stream or self.answer,
            TrustedProxies(trusted),
            self.count,
            deadline_s=deadline_s,
            max_pending=max_pending,
        )

    def count(self, reason: str) -> None:
        self.counts[reason] += 1

    async def answer(self, sniffed: Sniffed) -> None:
        self.streams.append(sniffed)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        server_tls = self.server_tls if sniffed.kind is StreamKind.TLS else None
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sniffed.sock, ssl=server_tls)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            first_line = await reader.readline()
            host, port = sniffed.client
            writer.write(f"{sniffed.kind.name} {host} {port} {sniffed.proxied}\n".encode() + first_line)
            await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> Harness:
        self.listener.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.listener.close()
        await self.listener.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:  # closed with our bytes unread: the kernel resets
        return b""


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def talk(port: int, data: bytes, *, half_close: bool = True) -> tuple[bytes, int]:
    """Send `data` (then FIN), return everything answered and our own port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    own_port = writer.get_extra_info("sockname")[1]
    with contextlib.suppress(OSError):  # refused ones may be reset before we are done
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
    answer = await read_to_eof(reader)
    await close(writer)
    return answer, own_port


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(800):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def v2_header(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    block = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
    family = 0x11 if src.version == 4 else 0x21
    return PROXY_V2 + struct.pack("!BBH", 0x21, family, len(block)) + block


def test_a_stun_client_is_handed_on_with_its_bytes_unread(run) -> None:
    async def main() -> None:
        async with Harness() as harness:
            answer, own_port = await talk(harness.port, STUN_REQUEST)
            assert answer == f"STUN 127.0.0.1 {own_port} False\n".encode() + STUN_REQUEST
            assert harness.counts == {}

    run(main)


def test_an_http_client_is_handed_on(run) -> None:
    async def main() -> None:
        async with Harness() as harness:
            answer, own_port = await talk(harness.port, b"GET / HTTP/1.1\r\n")
            assert answer == f"HTTP 127.0.0.1 {own_port} False\n".encode() + b"GET / HTTP/1.1\r\n"

    run(main)


def test_a_tls_client_completes_its_handshake_with_the_consumer(run, tls) -> None:
    server_tls, client_tls = tls

    async def main() -> None:
        async with Harness(server_tls) as harness:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", harness.port, ssl=client_tls, server_hostname="localhost"
            )
            own_port = writer.get_extra_info("sockname")[1]
            writer.write(b"hello over tls\n")
            answer = await read_to_eof(reader)
            await close(writer)
            assert answer == f"TLS 127.0.0.1 {own_port} False\nhello over tls\n".encode()

    run(main)


def test_a_trusted_proxy_v1_header_replaces_the_client_and_is_consumed(run) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.0/8",)) as harness:
            header = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 3478\r\n"
            answer, _ = await talk(harness.port, header + STUN_REQUEST)
            assert answer == b"STUN 203.0.113.9 51000 True\n" + STUN_REQUEST
            assert harness.streams[0].peer[0] == "127.0.0.1"

    run(main)


def test_a_trusted_proxy_v2_header_before_tls(run, tls) -> None:
    server_tls, client_tls = tls

    async def main() -> None:
        async with Harness(server_tls, trusted=("127.0.0.1",)) as harness:
            raw = socket.create_connection(("127.0.0.1", harness.port))
            raw.sendall(v2_header("2001:db8::9", "2001:db8::1", 40000, 443))
            raw.setblocking(False)
            reader, writer = await asyncio.open_connection(
                sock=raw, ssl=client_tls, server_hostname="localhost"
            )
            writer.write(b"through the balancer\n")
            answer = await read_to_eof(reader)
            await close(writer)
            assert answer == b"TLS 2001:db8::9 40000 True\nthrough the balancer\n"

    run(main)


def test_a_proxy_v2_local_header_keeps_the_peer(run) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.1",)) as harness:
            local = PROXY_V2 + b"\x20\x00\x00\x00"
            answer, own_port = await talk(harness.port, local + b"GET /health HTTP/1.1\r\n")
            assert answer == f"HTTP 127.0.0.1 {own_port} False\n".encode() + b"GET /health HTTP/1.1\r\n"

    run(main)


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8", "::1")], ids=["none trusted", "others trusted"])
@pytest.mark.parametrize(
    "header",
    [b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 3478\r\n", v2_header("203.0.113.9", "10.0.0.1", 1, 2)],
    ids=["v1", "v2"],
)
def test_a_proxy_header_from_an_untrusted_peer_closes_the_connection(run, trusted, header) -> None:
    async def main() -> None:
        async with Harness(trusted=trusted) as harness:
            answer, _ = await talk(harness.port, header + STUN_REQUEST)
            assert answer == b""
            await until(lambda: harness.counts == {"proxy_untrusted": 1}, "the refusal to be counted")
            assert harness.streams == []

    run(main)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 203.0.113.9 10.0.0.1 99999 3478\r\n" + STUN_REQUEST,
        PROXY_V2 + b"\x11\x11\x00\x0c" + bytes(12) + STUN_REQUEST,  # version 1
        PROXY_V2 + b"\x21\x11\xff\xff",  # longer than the bound: refused before it arrives
        b"PROXY TCP4 203.0.113.9 10.0.0.1 1 2\r\nPROXY TCP4 198.51.100.1 10.0.0.1 1 2\r\n" + STUN_REQUEST,
    ],
    ids=["v1 bad port", "v2 wrong version", "v2 too long", "two headers"],
)
def test_a_malformed_proxy_header_from_a_trusted_peer_closes_the_connection(run, data) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.1",), deadline_s=10) as harness:
            answer, _ = await talk(harness.port, data, half_close=False)
            assert answer == b""
            await until(lambda: harness.counts == {"proxy_malformed": 1}, "the refusal to be counted")

    run(main)


def test_a_client_that_never_sends_is_closed_at_the_deadline(run) -> None:
    async def main() -> None:
        async with Harness(deadline_s=0.3) as harness:
            reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
            assert await read_to_eof(reader) == b""
            await close(writer)
            assert harness.counts == {"sniff_timeout": 1}

    run(main)


def test_one_byte_then_silence_neither_spins_nor_blocks_others(run) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Harness(deadline_s=1.5) as harness:
            stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", harness.port)
            stalled_writer.write(b"\x00")  # could start a STUN header: undecidable
            await stalled_writer.drain()
            await until(lambda: harness.listener.pending == 1, "the stalled connection to be pending")
            readers_before = loop.readers_added  # type: ignore[attr-defined]
            for _ in range(5):
                answer, _ = await talk(harness.port, STUN_REQUEST)
                assert answer.startswith(b"STUN ")
            # Served while the stalled one still waits for its deadline.
            assert harness.counts == {} and harness.listener.pending == 1
            assert await read_to_eof(stalled_reader) == b""
            await close(stalled_writer)
            assert harness.counts == {"sniff_timeout": 1}
            # A peek per backoff step (20 ms doubling to 200 ms) over 1.5 s, and a few per
            # served client; a level-triggered reader on the readable socket would make thousands.
            assert loop.readers_added - readers_before < 80  # type: ignore[attr-defined]

    run(main)


def test_a_slowloris_proxy_header_is_closed_at_the_deadline(run) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.1",), deadline_s=0.5) as harness:
            reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
            drip = b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 3478"
            for index in range(len(drip)):  # one byte every 50 ms: would take 2 s
                if harness.counts:
                    break
                with contextlib.suppress(OSError):
                    writer.write(drip[index : index + 1])
                    await writer.drain()
                await asyncio.sleep(0.05)
            await until(lambda: harness.counts == {"sniff_timeout": 1}, "the deadline")
            assert await read_to_eof(reader) == b""
            await close(writer)

    run(main)


def test_the_deadline_covers_the_bytes_after_a_proxy_header(run) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.1",), deadline_s=0.3) as harness:
            answer, _ = await talk(harness.port, b"PROXY UNKNOWN\r\n", half_close=False)
            assert answer == b""
            assert harness.counts == {"sniff_timeout": 1}

    run(main)


def test_more_connections_than_max_pending_are_closed_at_once(run) -> None:
    async def main() -> None:
        async with Harness(deadline_s=5, max_pending=2) as harness:
            silent = [await asyncio.open_connection("127.0.0.1", harness.port) for _ in range(2)]
            await until(lambda: harness.listener.pending == 2, "two pending connections")
            answer, _ = await talk(harness.port, STUN_REQUEST)
            assert answer == b""
            assert harness.counts == {"sniff_overflow": 1}
            for _, writer in silent:
                await close(writer)
            await until(lambda: harness.listener.pending == 0, "the silent ones to hang up")
            assert harness.counts == {"sniff_overflow": 1, "sniff_eof": 2}
            answer, _ = await talk(harness.port, STUN_REQUEST)  # room again
            assert answer.startswith(b"STUN ")

    run(main)


@pytest.mark.parametrize(
    "sent", [b"", b"\x00\x01", b"PROXY TCP4 1"], ids=["nothing", "2 bytes", "half a header"]
)
def test_eof_before_a_decision_is_counted_long_before_the_deadline(run, sent) -> None:
    async def main() -> None:
        async with Harness(trusted=("127.0.0.1",), deadline_s=30) as harness:
            answer, _ = await talk(harness.port, sent)
            assert answer == b""
            await until(lambda: harness.counts == {"sniff_eof": 1}, "the EOF to be counted")

    run(main)


def test_a_reset_before_a_decision_is_counted_as_eof(run) -> None:
    async def main() -> None:
        async with Harness(deadline_s=30) as harness:
            raw = socket.create_connection(("127.0.0.1", harness.port))
            raw.sendall(b"\x00\x01")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # RST
            await until(lambda: harness.counts == {"sniff_eof": 1}, "the reset to be counted")

    run(main)


def test_an_exception_in_on_stream_is_counted_and_the_socket_closed(run) -> None:
    async def broken(sniffed: Sniffed) -> None:
        raise RuntimeError("consumer bug")

    async def main() -> None:
        async with Harness(on_stream=broken) as harness:
            answer, _ = await talk(harness.port, STUN_REQUEST)
            assert answer == b""
            await until(lambda: harness.counts == {"stream_error": 1}, "the error to be counted")
            answer, _ = await talk(harness.port, STUN_REQUEST)  # still accepting
            assert harness.counts == {"stream_error": 2}

    run(main)


def test_close_closes_pending_sniffs_and_the_listening_socket(run) -> None:
    async def main() -> None:
        harness = Harness(deadline_s=30)
        async with harness:
            reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
            await until(lambda: harness.listener.pending == 1, "a pending connection")
            harness.listener.close()
            await harness.listener.wait_closed()
            assert await read_to_eof(reader) == b""
            await close(writer)
            assert harness.sock.fileno() == -1
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", harness.port)

    run(main)


def test_accept_survives_running_out_of_descriptors(run) -> None:
    async def main() -> None:
        async with Harness() as harness:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # before the limit drops
            with socket.socket() as probe:
                lowest_free = probe.fileno()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                client.connect(("127.0.0.1", harness.port))
                await until(lambda: harness.counts["accept_error"] >= 2, "accept to fail (EMFILE)")
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            client.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(STUN_REQUEST)
            writer.write_eof()
            assert (await read_to_eof(reader)).startswith(b"STUN ")
            await close(writer)
            assert set(harness.counts) == {"accept_error"}

    run(main)


def test_close_right_after_start_still_closes_the_listening_socket(run) -> None:
    async def main() -> None:
        harness = Harness()
        harness.listener.start()
        harness.listener.close()  # the accept task is cancelled before it ever ran
        await harness.listener.wait_closed()
        assert harness.sock.fileno() == -1

    run(main)
