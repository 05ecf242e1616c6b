"""Fixtures of the data-plane tests."""

import os
import shutil
import tempfile

import pytest
import zmq


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def session_dir():
    # short path: ipc:// socket paths are limited to ~107 bytes
    path = tempfile.mkdtemp(prefix="fp-tr-")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)
