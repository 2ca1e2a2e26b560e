"""Atomic training checkpoints: out/checkpoints/step-N/ plus a `latest` pointer.

A checkpoint directory holds

* ``pyedge_adapters.safetensors``: the trainable tensors under their graph names,
* ``pyedge_adapters.json``: what they adapt (LoRA config, train patterns, loss, model hash),
  so ``pyedge eval --adapters <checkpoint>`` works on any checkpoint,
* ``optimizer.safetensors``: optimizer state, keys ``<state>::<tensor name>``,
* ``state.json``: step, epoch, data position, RNG state, lr, config hashes and the SHA-256 of
  every file above.

Writing is crash-safe: files go into ``.tmp-step-N-<pid>`` inside out/checkpoints, each is
fsynced, the directory is fsynced and renamed to ``step-N`` (atomic), the parent fsynced, and
only then the ``latest`` pointer is replaced (write temp + fsync + os.replace + fsync parent).
A crash at any point leaves the previous ``latest`` loadable. Pruning old checkpoints renames
each to ``.trash-step-N-<pid>`` (atomic, fsynced) before deleting it, so a kill mid-delete
never leaves a listed step-N half-deleted. A training run holds a flock on out/checkpoints
(`RunLock`) and, at its start, removes the temp and trash dirs a killed run left
(`cleanup_temp`). Only safetensors and JSON are read back: nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

ADAPTERS = "pyedge_adapters.safetensors"
ADAPTERS_META = "pyedge_adapters.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
LATEST = "latest"
FORMAT = "pyedge-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")

# Test hooks: called with each file name after it is written into the temp directory, and
# after it is deleted from a pruned checkpoint.
_after_file_write = None
_after_unlink = None


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (one line)."""


@dataclasses.dataclass
class Checkpoint:
    path: Path
    state: dict
    tensors: dict[str, np.ndarray]
    optimizer_state: dict[str, dict[str, np.ndarray]]
    adapter_meta: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


# --------------------------------------------------------------------------- low-level io
def fsync_dir(path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def write_file_synced(path, data: bytes, mode: int | None = None) -> None:
    """Writes and fsyncs `path`; with `mode` (e.g. 0o600 for a private key) the file is
    created with that mode, never readable by others in between."""
    if mode is None:
        fh = open(path, "wb")
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     mode)
        os.fchmod(fd, mode)   # an existing file (a temp left by a kill) keeps its old mode
        fh = os.fdopen(fd, "wb")
    with fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path, data: bytes, mode: int | None = None) -> None:
    """Replaces `path` atomically: temp file in the same folder (created with `mode` when
    given), fsync, os.replace, fsync dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if mode is None:
            write_file_synced(tmp, data)
        else:
            write_file_synced(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save(arrays, metadata={k: str(v) for k, v in (metadata or {}).items()} or None)


def tensors_from_bytes(data: bytes, where: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{where}: not a valid safetensors file ({e})") from None


def flatten_optimizer_state(state: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{k}::{name}": arr for name, d in state.items() for k, arr in d.items()}


def unflatten_optimizer_state(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in flat.items():
        k, _, name = key.partition("::")
        out.setdefault(name, {})[k] = arr
    return out


# --------------------------------------------------------------------------- directories
def write_dir_atomically(target: Path, files: dict[str, bytes], parent: Path | None = None,
                         tmp_name: str | None = None) -> None:
    """Writes `files` into a fresh directory that appears at `target` in one rename."""
    target = Path(target)
    parent = Path(parent or target.parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / (tmp_name or f".tmp-{target.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_file_synced(tmp / name, data)
            if _after_file_write is not None:
                _after_file_write(name)
        fsync_dir(tmp)
        replace_dir(tmp, target)  # same step written again (e.g. after a crash before `latest`)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Puts the complete directory `tmp` at `target` (same parent folder). An existing target
    is first renamed to ``.old-<name>-<pid>`` (one atomic rename) and deleted only after
    `tmp` took its place, so a kill leaves the old directory whole, the new one whole, or
    (between the two renames) both whole under their temporary names; never a half-deleted
    or mixed one. recover_replaced (also run by cleanup_temp) puts an old directory back when
    its name is free, and removes it otherwise."""
    tmp, target = Path(tmp), Path(target)
    trash = None
    if target.exists():
        trash = target.parent / f".old-{target.name}-{os.getpid()}"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(target, trash)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


_OLD_RE = re.compile(r"^\.old-(.+)-\d+$")


def recover_replaced(parent, name: str | None = None) -> None:
    """After a kill inside replace_dir: an ``.old-<name>-<pid>`` directory whose `name` is free
    again (killed between the two renames) is renamed back, being the only whole copy at that
    place; one whose name is taken (killed while deleting it) is removed. `name`: only that
    directory's leftovers."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir(), key=lambda q: q.name):
        m = _OLD_RE.match(p.name)
        if not m or not p.is_dir() or (name is not None and m.group(1) != name):
            continue
        if (parent / m.group(1)).exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.rename(p, parent / m.group(1))
            fsync_dir(parent)


def list_checkpoints(root) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def cleanup_temp(root) -> None:
    """Removes half-written temp dirs and half-deleted trash dirs left by a crash (never a
    complete step-N), after recover_replaced. Call it with the run's lock held (lock_run) so no live writer's temp
    dir is touched."""
    root = Path(root)
    if not root.is_dir():
        return
    recover_replaced(root)
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-", f".{LATEST}.tmp-")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass


_ATOMIC_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def cleanup_temp_files(folder) -> None:
    """Removes atomic_write's temp files (``.<name>.tmp-<pid>``) a kill left in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _ATOMIC_TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except OSError:
                pass


def save_checkpoint(root, step: int, tensors: dict[str, np.ndarray],
                    optimizer_state: dict[str, dict[str, np.ndarray]], state: dict,
                    adapter_meta: dict, keep: int = 3) -> Path:
    """Writes out/checkpoints/step-<step> atomically, points `latest` at it, keeps the last
    `keep` checkpoints (0: keep all). Returns the checkpoint directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {
        ADAPTERS: tensors_to_bytes(tensors, {"format": "pyedge"}),
        OPTIMIZER: tensors_to_bytes(flatten_optimizer_state(optimizer_state)),
        ADAPTERS_META: json.dumps(adapter_meta, indent=1, sort_keys=True).encode(),
    }
    st = dict(state)
    st.update(format=FORMAT, version=VERSION, step=int(step),
              files={k: _sha256(v) for k, v in files.items()})
    files[STATE] = json.dumps(st, indent=1, sort_keys=True).encode()  # written last
    name = f"step-{int(step)}"
    write_dir_atomically(root / name, files, root)
    atomic_write(root / LATEST, (name + "\n").encode())
    prune(root, keep)
    return root / name


def prune(root, keep: int) -> None:
    """Removes all but the newest `keep` checkpoints (never the one `latest` names).

    Crash-safe: each one is first renamed to a trash name (one atomic rename; listings ignore
    trash names) and the rename made durable, then deleted. A kill at any moment leaves every
    listed step-N whole; a half-deleted trash dir is removed by the next cleanup_temp."""
    if keep <= 0:
        return
    root = Path(root)
    cur = read_latest_pointer(root)
    cks = list_checkpoints(root)
    for _, p in cks[:-keep]:
        if cur is not None and p.name == cur:
            continue
        trash = root / f".trash-{p.name}-{os.getpid()}"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(p, trash)
        fsync_dir(root)
        _remove_tree(trash)


def _remove_tree(path: Path) -> None:
    """shutil.rmtree, file by file so that a test can widen the kill window (_after_unlink)."""
    if _after_unlink is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    for f in sorted(path.iterdir()):
        f.unlink()
        _after_unlink(f.name)
    path.rmdir()


def read_latest_pointer(root) -> str | None:
    try:
        name = (Path(root) / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_RE.match(name) else None


def load_checkpoint(path, verify: bool = True) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no {STATE})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/{STATE}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{STATE}: not a pyedge checkpoint")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['version']} is newer "
                              f"than this pyedge understands ({VERSION})")
    blobs = {}
    for name in (ADAPTERS, OPTIMIZER, ADAPTERS_META):
        try:
            blobs[name] = (path / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path}: missing {name} ({e.strerror})") from None
        want = state.get("files", {}).get(name)
        if verify and want and _sha256(blobs[name]) != want:
            raise CheckpointError(f"{path}/{name}: checksum mismatch (corrupt checkpoint)")
    try:
        meta = json.loads(blobs[ADAPTERS_META])
    except ValueError as e:
        raise CheckpointError(f"{path}/{ADAPTERS_META}: unreadable ({e})") from None
    tensors = tensors_from_bytes(blobs[ADAPTERS], f"{path}/{ADAPTERS}")
    optim = unflatten_optimizer_state(tensors_from_bytes(blobs[OPTIMIZER], f"{path}/{OPTIMIZER}"))
    return Checkpoint(path, state, tensors, optim, meta)


def latest_checkpoint_path(root) -> Path | None:
    """The checkpoint `latest` points to, or else the newest complete step-N directory."""
    root = Path(root)
    name = read_latest_pointer(root)
    if name is not None and (root / name / STATE).is_file():
        return root / name
    for _, p in reversed(list_checkpoints(root)):
        if (p / STATE).is_file():
            return p
    return None


def load_latest(root, warn=None) -> Checkpoint | None:
    """Loads the latest checkpoint; falls back to older ones if it is unreadable."""
    root = Path(root)
    first = latest_checkpoint_path(root)
    if first is None:
        return None
    candidates = [first] + [p for _, p in reversed(list_checkpoints(root)) if p != first]
    errors = []
    for p in candidates:
        try:
            ck = load_checkpoint(p)
        except CheckpointError as e:
            errors.append(str(e))
            if warn:
                warn(f"skipping unreadable checkpoint: {e}")
            continue
        return ck
    raise CheckpointError(f"{root}: no loadable checkpoint ({'; '.join(errors)})")


class RunLock:
    """An exclusive advisory lock (flock) on the checkpoint folder for one training run: a
    second run on the same --out fails at once instead of interleaving checkpoints, and
    cleanup_temp may remove every temp dir it finds. The kernel drops the lock when the
    process dies, also on SIGKILL. A no-op where fcntl is missing."""

    def __init__(self, root):
        self.root = Path(root)
        self.fd = None
        self.created: list[Path] = []

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        # folders made here are removed again if the run leaves them empty (a run refused
        # for its options or data leaves nothing behind)
        self.created = [p for p in (self.root, self.root.parent) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(str(self.root), os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"{self.root}: another pyedge run is using this folder "
                                  "(choose another --out or wait for it to finish)") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            for p in self.created:  # innermost first; rmdir refuses a non-empty folder
                try:
                    p.rmdir()
                except OSError:
                    break
            os.close(self.fd)  # closing the last fd releases the flock
            self.fd = None
        return False


def has_checkpoints(root) -> bool:
    return bool(list_checkpoints(root)) or (Path(root) / LATEST).exists()


# --------------------------------------------------------------------------- adapters
def write_adapters_dir(target, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    """The final adapters in pyedge's raw format (same files as in a checkpoint)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / ADAPTERS, tensors_to_bytes(tensors, {"format": "pyedge"}))
    atomic_write(target / ADAPTERS_META, json.dumps(meta, indent=1, sort_keys=True).encode())
    return target


def read_adapters_dir(path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(tensors, meta) from a pyedge adapters or checkpoint directory; None if not one."""
    path = Path(path)
    if not (path / ADAPTERS).is_file() or not (path / ADAPTERS_META).is_file():
        return None
    root = os.path.realpath(path)
    for name in (ADAPTERS, ADAPTERS_META):
        real = os.path.realpath(path / name)
        if os.path.commonpath([root, real]) != root:
            raise CheckpointError(f"{path / name}: resolves to {real}, outside the adapters "
                                  "folder (a symlink out of it); refused")
    try:
        meta = json.loads((path / ADAPTERS_META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/{ADAPTERS_META}: unreadable ({e})") from None
    tensors = tensors_from_bytes((path / ADAPTERS).read_bytes(), f"{path}/{ADAPTERS}")
    return tensors, meta
