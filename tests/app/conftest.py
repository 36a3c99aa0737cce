import socket

import pytest


@pytest.fixture(scope="module")
def free_port() -> int:
    """A port nothing listens on now (the OS's pick), for an app to serve on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
