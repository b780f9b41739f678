"""Small helpers every stage shares: the user-facing error, atomic writes, hashing, timers,
logging, devices and seeds."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


class SppdetError(Exception):
    """A problem with the user's input (file, config, data), reported as one line, no traceback.

    The message names the file or key and what is wrong with it.
    """


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    Readers never see a half-written file: an interruption leaves at most a stray temporary
    (named `.<name>.tmp-*`), never a truncated `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)  # mkstemp makes 0600 files: give outputs the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def stable_hash(*parts, length: int = 16) -> str:
    """Hex digest of JSON-serialisable parts (dict keys sorted) and raw bytes, for cache keys."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-1 of a file's bytes (its content, not its name or time)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class Timer:
    """Accumulates wall time over calls: `with timer: ...`; `timer.average` is seconds per call.

    With a CUDA `device` it waits for the queued GPU work at both ends, so asynchronous kernels
    are charged to the block that launched them."""

    def __init__(self, device=None) -> None:
        self.total = 0.0
        self.calls = 0
        self._start = 0.0
        self._cuda = device is not None and getattr(device, "type", str(device)) == "cuda"

    def _sync(self) -> None:
        if self._cuda:
            import torch
            torch.cuda.synchronize()

    def __enter__(self) -> "Timer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.total += time.perf_counter() - self._start
        self.calls += 1

    @property
    def average(self) -> float:
        return self.total / max(self.calls, 1)


def get_logger(name: str = "sppdet", log_file: str | os.PathLike | None = None) -> logging.Logger:
    """Logger that prints to stderr and, if given, appends to `log_file`."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if log_file is not None:
        log_file = str(Path(log_file).resolve())
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == log_file
                   for h in logger.handlers):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(handler)
    logger.propagate = False
    return logger


def pick_device(name: str = "auto"):
    """'auto' -> CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SppdetError(f"run.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's `main`; a SppdetError becomes one line on stderr and exit status 1,
    Ctrl-C exits 130 (finished stages are already saved; rerun with --resume)."""
    try:
        code = main(argv)
    except SppdetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
