"""Fixtures and helpers several test modules share."""

import socket

import pytest
import torch


def tiny_workflow_config(port: int) -> dict:
    """A tiny demo config for running the whole DAG in a test: a few landmarks and views, 2 download
    partitions, short timeouts, one experiment, one epoch at 64 px."""
    return {
        "demo": {"landmarks": 5, "views_per_landmark": 7, "nonlandmarks": 16, "broken_fraction": 0.1,
                 "port": port},
        "split": {"partitions": 2},
        "download": {"connect_timeout_s": 2, "read_timeout_s": 2, "total_timeout_s": 3, "retries": 1,
                     "backoff_s": 0.1, "concurrency": 8},
        "select": {"min_images_per_class": 3, "val_fraction": 0.15, "test_fraction": 0.2},
        "shard": {"size": 72, "images_per_shard": 16, "threads": 1},
        "train": {"image_size": 64, "epochs": 1, "batch_size": 8, "workers": 0, "embedding_dim": 64},
        "embed": {"batch_size": 32, "workers": 0},
        "retrieve": {"k": 5},
        "experiments": {"tiny": {"description": "tiny test experiment"}},
    }


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
