"""A Unix-socket listener whose peers prove a key (multiprocessing's challenge), for the engine processes' sockets
(serving/engine_main.py) and the master's control socket (serving/master.py). No peer can stop it from accepting:
each proves the key in a thread of its own, within HANDSHAKE_TIMEOUT_S, or is logged and dropped."""
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

log = logging.getLogger("effective-batching")

HANDSHAKE_TIMEOUT_S = 5.0


class Listener:
    """A Unix socket that takes connections proving `authkey` (multiprocessing's challenge), each checked in a
    thread of its own so that no peer holds up the others; accepted connections wait in `connected`."""

    def __init__(self, address: str, authkey: bytes):
        self.authkey = authkey
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(address)
        self.sock.listen(64)
        self.connected: queue.SimpleQueue[Connection] = queue.SimpleQueue()

    def accept_one(self, gone: Callable[[], bool]) -> Connection:
        """One connection, handshaken on this thread; EOFError once `gone()` says that none will come."""
        self.sock.settimeout(0.1)
        while True:
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                if gone():
                    raise EOFError from None
                continue
            sock.settimeout(None)
            return self._handshake(sock)

    def accept_forever(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed: the engine is stopping
                return
            threading.Thread(target=self._take, args=(sock,), name="handshake", daemon=True).start()

    def _take(self, sock: socket.socket) -> None:
        try:
            self.connected.put(self._handshake(sock))
        except Exception as e:  # no key, a wrong one, garbage, or silence
            log.warning("refused a connection: %s", e or type(e).__name__)

    def _handshake(self, sock: socket.socket) -> Connection:
        conn = Connection(os.dup(sock.fileno()))
        # a silent peer: shutting the socket down wakes the read that waits for it
        timer = threading.Timer(HANDSHAKE_TIMEOUT_S, shut_down, (sock,))
        timer.start()
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except BaseException:
            conn.close()
            raise
        finally:
            timer.cancel()
            sock.close()  # conn holds the socket through its own descriptor
        return conn

    def close(self) -> None:
        self.sock.close()


def shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile: the handshake ended
        pass
