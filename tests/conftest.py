"""Fixtures and helpers several test modules share."""

import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for the demo server of a test workflow)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra threads only add contention (and timing noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
