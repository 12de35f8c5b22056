"""The listening socket of a server ``rlhf serve`` starts, bound before the model loads.

Binding first means a taken port is reported at once, by the option that chose it, instead of after a
model load (or a vLLM start-up of half a minute) that was for nothing.
"""

from __future__ import annotations

import socket

from rlhf_core.errors import UserError


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, or a UserError naming the option to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"option --host/--port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another --port, or a --host of this machine"
        ) from None
    sock.listen(128)
    return sock


def check_port_free(host: str, port: int) -> None:
    """UserError unless ``host:port`` can be listened on now (for a server another process will bind)."""
    bind_socket(host, port).close()


def base_url(host: str, port: int) -> str:
    """``http://HOST:PORT/v1``, with an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"
