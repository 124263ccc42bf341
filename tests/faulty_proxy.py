"""A TCP proxy on loopback that injects real network faults in front of the test S3 server:
it resets the first N connections (a TCP RST, as a load balancer dropping a node would), or
every connection, and forwards the rest byte for byte."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FaultyProxy:
    def __init__(self, target_port: int, *, reset_first: int = 0, reset_all: bool = False):
        self.target = ("127.0.0.1", target_port)
        self.reset_first, self.reset_all = reset_first, reset_all
        self.connections = self.resets = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self.reset_all or self.connections <= self.reset_first:
                self.resets += 1
                # SO_LINGER 0: close() sends RST instead of FIN.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock in (src, dst):  # one side is done: end both directions
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
