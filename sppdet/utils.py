"""Small helpers every stage shares: the user-facing error, atomic writes, verified files,
hashing, timers, logging, devices and seeds."""
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


class CorruptFileError(SppdetError):
    """A file sppdet wrote earlier whose bytes no longer match the digest stored with them (or
    that cannot be read back at all). Caches recompute; checkpoints refuse to load."""


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files: the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """SppdetError (one line naming `what`, e.g. "--out") unless `path` is, or can be created as,
    a writable folder. Call before slow work, so a bad output path fails at once."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SppdetError(f"{what} {p}: exists and is not a folder")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SppdetError(f"{what} {p}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SppdetError(f"{what} {p}: {existing} is not writable")


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """As `check_writable_dir`, for an output file: not a folder, its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise SppdetError(f"{what} {p}: is a folder; expected a file name")
    check_writable_dir(p.parent if str(p.parent) else Path("."), what)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class FolderLock:
    """An exclusive claim on a folder while a process writes to it: `<folder>/.lock` holds the
    owner's pid and host, created atomically (O_EXCL). A second claimant gets one SppdetError
    naming the holder; a lock whose process is gone (killed) is taken over with a warning."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.path = Path(folder) / ".lock"
        self.what = what
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "FolderLock":
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~current_umask())
            except FileExistsError:
                holder = self._holder()
                if holder and holder.get("host") == me["host"] and _alive(holder.get("pid")):
                    raise SppdetError(f"{self.path.parent}: in use by process {holder['pid']} (since "
                                      f"{holder.get('since', '?')}); wait for it to finish or choose "
                                      f"another {self.what}") from None
                if holder and holder.get("host") != me["host"]:
                    raise SppdetError(f"{self.path.parent}: locked by process {holder.get('pid')} on "
                                      f"{holder.get('host')}; if that run is over, delete {self.path}")
                get_logger().warning(f"{self.path.parent}: taking over the lock of process "
                                     f"{(holder or {}).get('pid', '?')}, which is gone")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise SppdetError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


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


def content_digest(obj) -> str:
    """BLAKE2b digest of a nested structure of dicts, lists, tensors, numpy arrays and plain
    values: tensors by dtype, shape and bytes, dict items in key order. What `save_verified`
    stores with a file and `load_verified` checks."""
    h = hashlib.blake2b(digest_size=20)

    def walk(x) -> None:
        if isinstance(x, dict):
            h.update(b"{%d" % len(x))
            for k in sorted(x, key=str):
                walk(str(k))
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[%d" % len(x))
            for v in x:
                walk(v)
        elif isinstance(x, np.ndarray):
            h.update(f"a{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1).data)
        elif hasattr(x, "detach") and hasattr(x, "dtype"):  # a torch tensor
            import torch

            t = x.detach().cpu().contiguous()
            h.update(f"t{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():  # as raw bytes, whatever the dtype (bfloat16 has no numpy twin)
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, (bytes, bytearray)):
            h.update(b"b")
            h.update(bytes(x))
        else:
            h.update(json.dumps(x, default=str).encode())
    walk(obj)
    return h.hexdigest()


def save_verified(obj, path: str | os.PathLike) -> None:
    """torch.save `obj` atomically, with its `content_digest` stored beside it in the file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save({"sppdet_digest": content_digest(obj), "content": obj}, tmp)


def load_verified(path: str | os.PathLike, weights_only: bool = False):
    """The object `save_verified` wrote to `path`, on the CPU; CorruptFileError if it cannot be
    read or its content no longer matches the stored digest (changed bytes, truncation)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # truncated zip, garbled pickle, not a torch file, ...
        raise CorruptFileError(f"{path}: unreadable ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:120] or 'truncated?'})") from None
    if not isinstance(payload, dict) or "sppdet_digest" not in payload or "content" not in payload:
        raise CorruptFileError(f"{path}: not a verified sppdet file (no content digest)")
    if content_digest(payload["content"]) != payload["sppdet_digest"]:
        raise CorruptFileError(f"{path}: content does not match its digest (the file was changed "
                               f"or damaged after it was written)")
    return payload["content"]


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-1 of a file's bytes (its content, not its name or time)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def file_signature(path: str | os.PathLike, edge: int = 1 << 16) -> str:
    """A cheap proxy of a file's content for cache keys: its size, modification time and a hash
    of its first and last `edge` bytes. Changes whenever the file is rewritten."""
    st = os.stat(path)
    h = hashlib.blake2b(f"{st.st_size}:{st.st_mtime_ns}".encode(), digest_size=12)
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if st.st_size > edge:
            f.seek(max(edge, st.st_size - edge))
            h.update(f.read(edge))
    return h.hexdigest()


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


@contextlib.contextmanager
def run_log(log_file: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """The "sppdet" logger, also appending to `log_file` inside the block (a run's train.log);
    the file handler goes when the block ends, so a later run in this process (a detection
    run after its pretraining, tests, notebooks) does not write into this run's log."""
    logger = get_logger("sppdet", log_file)
    try:
        yield logger
    finally:
        if log_file is not None:
            path = str(Path(log_file).resolve())
            for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                            and h.baseFilename == path]:
                logger.removeHandler(handler)
                handler.close()


def pick_device(name: str = "auto", key: str = "run.device"):
    """'auto' -> CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given. Anything
    else, or CUDA on a machine without it, is a SppdetError naming `key`."""
    import re

    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise SppdetError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SppdetError(f"{key}={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SppdetError(f"{key}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)


def torch_rng_state() -> dict:
    """torch's global generators (dropout draws from them): CPU, and each CUDA device in use."""
    import torch

    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_torch_rng_state(states: dict) -> None:
    import torch

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's `main`; a SppdetError, or a file system error (permissions, a full disk, a
    file where a folder should be), becomes one line on stderr and exit status 1; Ctrl-C exits
    130 (finished stages are already saved; rerun with --resume)."""
    try:
        code = main(argv)
    except SppdetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
