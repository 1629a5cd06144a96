"""Fixtures and helpers several test modules share."""

import socket

import pytest
import torch


def tiny_workflow_config(port: int) -> dict:
    """A small demo config for running the whole DAG in a test: 20 landmarks x 8 views, 2 download
    partitions, short timeouts, 3 epochs at 96 px, and two experiments: the fine-tuned model and its
    untrained backbone (the baseline it must beat)."""
    return {
        "demo": {"landmarks": 20, "views_per_landmark": 8, "nonlandmarks": 20, "broken_fraction": 0.1,
                 "port": port},
        "split": {"partitions": 2},
        "download": {"connect_timeout_s": 2, "read_timeout_s": 2, "total_timeout_s": 3, "retries": 1,
                     "backoff_s": 0.1, "concurrency": 8},
        "select": {"min_images_per_class": 3, "val_fraction": 0.1, "test_fraction": 0.3},
        "shard": {"size": 112, "images_per_shard": 16, "threads": 1},
        "train": {"image_size": 96, "epochs": 3, "batch_size": 16, "lr": 0.0005, "workers": 0},
        "embed": {"batch_size": 32, "workers": 0},
        "retrieve": {"k": 5},
        "experiments": {"tiny": {"description": "tiny test experiment"},
                        "baseline": {"description": "the untrained backbone", "train": {"epochs": 0}}},
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
