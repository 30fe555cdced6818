"""The socket evalserve binds itself (before the models load) must behave like the one uvicorn
would have opened: connections accepted on it have Nagle's algorithm off. Without TCP_NODELAY
every small response waited for the client's delayed ACK, about 40 ms a request."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.server import PortInUse, bind


def test_accepted_connections_have_nagle_off() -> None:
    async def scenario() -> int:
        listener = bind("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connection = writer.get_extra_info("socket")
            accepted.set_result(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        port = listener.getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(scenario()) != 0


def test_a_taken_port_is_refused_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"cannot listen on 127.0.0.1:{port}: Address already"):
            bind("127.0.0.1", port)
