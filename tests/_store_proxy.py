"""A TCP proxy in front of a store's endpoint (moto's S3 server) that the tests switch between answering, hanging
(connections accepted, nothing forwarded or answered: a network partition, a stalled S3) and refusing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class StoreProxy:
    """Listens on 127.0.0.1 (``endpoint``) and forwards to ``target`` (``host:port``) while ``mode`` is
    ``"forward"``; ``"hang"``: new and open connections get no byte either way (held until the mode changes back);
    ``"refuse"``: new connections are closed at once and open ones dropped."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host.split("//")[-1], int(port))
        self.mode = "forward"
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str) -> None:
        """Switch to ``forward``, ``hang`` or ``refuse``."""
        assert mode in ("forward", "hang", "refuse"), mode
        self.mode = mode
        if mode == "refuse":
            self._drop()

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed = True
        self._server.close()
        self._drop()

    def _drop(self) -> None:
        for s in list(self._open):
            with contextlib.suppress(OSError):
                s.close()
        self._open.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if self.mode == "refuse":
                conn.close()
                continue
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        while self.mode == "hang" and not self._closed:  # accepted, never answered (until the mode changes)
            time.sleep(0.02)
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        self._open.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == "hang" and not self._closed:  # held: a stalled link
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
