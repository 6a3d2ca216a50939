"""The conventions of a checkpoint save directory: tags, ``latest``, manifests, retention, and which one to read.

Layout::

    save/step500/                 DeepSpeed's model and optimizer files, config.json, rng_rank{r}.pt
    save/step500/manifest.json    every other file's size and xxh3-64 hashes (per 64 MiB block), written after them
    save/latest                   "step500", written after the manifest

A step directory is *intact* when its manifest exists and every file it lists has that size and checksum.
``resume_tag`` picks what to load: the checkpoint ``latest`` names when intact, else (with a warning) the newest
intact one, or a clear refusal. Checkpoints written before manifests existed (no step directory of the save
directory has one) are read as before. This module is below both megagpt/checkpoint.py (save/load) and
megagpt/convert (layout reading), so neither imports the other for these conventions.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
BLOCK_BYTES = 64 << 20  # hashed per block, so blocks of one large file are hashed in parallel
HASH = "xxh3_64"  # ~5 GB/s per core: a save's read-back costs far less than the save (benchmarks/)
_TAG = re.compile(r"^step(\d+)$")


class DamagedCheckpoint(ValueError):
    """A checkpoint that fails its manifest (and, when resuming, no intact one to fall back to, or
    ``strict_resume``). The message names every file and what is wrong with it."""
_RNG_FILE = re.compile(r"^rng_rank(\d+)\.pt$")


def step_tag(step: int) -> str:
    """The checkpoint tag (directory name) of optimizer step ``step``."""
    return f"step{step}"


def tag_step(tag: str) -> int:
    """The optimizer step of tag ``step{N}``; ValueError for another name."""
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step<N>)")
    return int(match.group(1))


def rng_file(rank: int) -> str:
    """The name of rank ``rank``'s RNG-state file in a step directory."""
    return f"rng_rank{rank}.pt"


def step_tags(directory: str | os.PathLike) -> list[str]:
    """Every ``step{N}`` directory in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p.name for p in sorted((p for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)),
                                   key=lambda p: tag_step(p.name))]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def latest_tag(directory: str | os.PathLike) -> str | None:
    """The tag named by ``directory/latest``, or None when there is no checkpoint yet.

    ValueError when ``latest`` names a directory that does not exist (it was deleted by hand)."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (Path(directory) / tag).is_dir():
        raise ValueError(f"{path} names checkpoint {tag!r} but {Path(directory) / tag} does not exist; "
                         f"point {path} at an existing step directory or delete it to start afresh")
    return tag


def saved_world_size(step_dir: str | os.PathLike) -> int:
    """How many ranks wrote the checkpoint in ``step_dir`` (one RNG file each)."""
    return sum(1 for p in Path(step_dir).iterdir() if _RNG_FILE.match(p.name))


# ---- reading files without running code from them ----
def _allowed_globals() -> list:
    """The non-tensor types megagpt's and DeepSpeed's checkpoint files hold: numpy arrays (RNG states) and
    DeepSpeed's ZeRO stage enum, fragment addresses and loss scalers (optimizer shards)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_types = [np.ndarray, np.dtype, np._core.multiarray._reconstruct,
                   *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}]
    return [*numpy_types, ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_torch_file(path: str | os.PathLike, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with the allow-list above, on the CPU. A file that needs any other
    type (it could run code when unpickled) is refused with a ValueError naming the file and the type."""
    import pickle

    import torch

    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            # torch's message names the refused GLOBAL on one of its lines
            lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
            reason = lines[0].strip() if lines else str(err).strip().splitlines()[-1]
            raise ValueError(f"{path} holds objects outside megagpt's allow-list of checkpoint types, refused "
                             f"because loading them could run code: {reason}. Load it only if you trust its "
                             "source (e.g. torch.load(weights_only=False) in your own script)") from None


# ---- manifests ----
def _block_hash(path: Path, offset: int, length: int) -> str:
    import xxhash

    with open(path, "rb") as f:
        f.seek(offset)
        return xxhash.xxh3_64_hexdigest(f.read(length))  # file reads release the GIL: threads overlap them


def _checksums(step_dir: Path, names: list[str]) -> dict[str, dict]:
    sizes = {name: (step_dir / name).stat().st_size for name in names}
    jobs = [(name, offset) for name in names for offset in range(0, max(sizes[name], 1), BLOCK_BYTES)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda job: _block_hash(step_dir / job[0], job[1], BLOCK_BYTES), jobs))
    files = {name: {"size": sizes[name], HASH: []} for name in names}
    for (name, _), digest in zip(jobs, digests):
        files[name][HASH].append(digest)
    return files


HASHES_PART = ".hashes.rank{}.json"  # each rank's hashes of the files it wrote, merged into the manifest


class HashingWriter:
    """A binary file object that hashes what is written, block by block, as ``write_manifest`` would read it
    back: a save then needs no second pass over its bytes."""

    def __init__(self, file):
        import xxhash

        self._file, self._new = file, xxhash.xxh3_64
        self.size, self._hash, self._blocks = 0, self._new(), []

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            chunk = view[done:done + BLOCK_BYTES - self.size % BLOCK_BYTES]
            self._hash.update(chunk)
            self._file.write(chunk)
            self.size += len(chunk)
            done += len(chunk)
            if self.size % BLOCK_BYTES == 0:
                self._blocks.append(self._hash.hexdigest())
                self._hash = self._new()
        return len(view)

    def flush(self) -> None:
        self._file.flush()

    def entry(self) -> dict:
        """The manifest entry of what was written."""
        tail = [self._hash.hexdigest()] if self.size % BLOCK_BYTES or self.size == 0 else []
        return {"size": self.size, HASH: self._blocks + tail}


def torch_save_hashed(obj, path: str | os.PathLike, hashes: dict) -> None:
    """``torch.save(obj, path)`` that records the file's manifest entry in ``hashes[path]``."""
    import torch

    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
    hashes[os.fspath(path)] = writer.entry()


def write_hashes_part(step_dir: str | os.PathLike, rank: int, hashes: dict) -> None:
    """Leave this rank's hashes of the files it wrote into ``step_dir`` for ``write_manifest``."""
    step_dir = Path(step_dir)
    entries = {str(Path(p).relative_to(step_dir)): e for p, e in hashes.items() if Path(p).parent == step_dir
               or step_dir in Path(p).parents}
    atomic_write_text(step_dir / HASHES_PART.format(rank), json.dumps(entries))


def _files_of(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(step_dir: str | os.PathLike) -> Path:
    """Hash every file of ``step_dir`` (recursively; dot-files excluded) into its manifest. Files whose hashes
    the ranks recorded while writing them (``write_hashes_part``, at the size they have now) are not read
    again; the rest are read back."""
    step_dir = Path(step_dir)
    recorded = {}
    for part in sorted(step_dir.glob(HASHES_PART.format("*"))):
        recorded.update(json.loads(part.read_text()))
    names = _files_of(step_dir)
    known = {n: recorded[n] for n in names if n in recorded and recorded[n]["size"] == (step_dir / n).stat().st_size}
    files = {**_checksums(step_dir, [n for n in names if n not in known]), **known}
    manifest = {"format": MANIFEST_FORMAT, "block_bytes": BLOCK_BYTES, "hash": HASH,
                "files": {n: files[n] for n in names}}
    atomic_write_text(step_dir / MANIFEST, json.dumps(manifest, indent=1))
    for part in step_dir.glob(HASHES_PART.format("*")):
        part.unlink()
    return step_dir / MANIFEST


def checkpoint_problems(step_dir: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with ``step_dir`` against its manifest (empty: intact): missing manifest, missing files,
    wrong sizes, and (``checksums``) blocks whose hash differs, each naming the file."""
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = manifest["files"]
        if (manifest.get("format"), manifest.get("block_bytes"), manifest.get("hash")) != (
                MANIFEST_FORMAT, BLOCK_BYTES, HASH):
            return [f"{step_dir / MANIFEST}: unknown format {manifest.get('format')!r}"]
    except FileNotFoundError:
        return [f"{step_dir / MANIFEST} is missing (the save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{step_dir / MANIFEST} is unreadable ({type(err).__name__}: {err})"]
    problems, present = [], []
    for name, entry in files.items():
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path} is {path.stat().st_size} bytes, the manifest says {entry['size']} "
                            "(truncated or rewritten)")
        else:
            present.append(name)
    if checksums and present:
        actual = _checksums(step_dir, present)
        problems += [f"{step_dir / name} does not match its checksum in the manifest (damaged)"
                     for name in present if actual[name][HASH] != files[name][HASH]]
    return problems


def _has_manifests(directory: Path) -> bool:
    return any((directory / tag / MANIFEST).exists() for tag in step_tags(directory))


def _from_before_manifests(directory: Path, tag: str) -> bool:
    """True for a step directory without a manifest that is older than every one with a manifest (written by
    megagpt before manifests existed), as opposed to a save that never finished."""
    with_manifest = [tag_step(t) for t in step_tags(directory) if (directory / t / MANIFEST).exists()]
    return not (directory / tag / MANIFEST).exists() and (not with_manifest or tag_step(tag) < min(with_manifest))


# step directory -> what its files looked like when they last verified in this process. A tool reaches
# verify_step_dir through several paths (the checkpoint's home, its weights, its step); hashing gigabytes once is
# enough while no file has changed size or mtime since.
_VERIFIED: dict[Path, tuple] = {}


def _file_stats(step_dir: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(step_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in step_dir.rglob("*") if p.is_file()))


def verify_step_dir(step_dir: str | os.PathLike) -> None:
    """ValueError naming what is wrong when ``step_dir`` is not intact. A checkpoint from before manifests
    (none in its save directory has one) passes unchecked."""
    step_dir = Path(step_dir)
    if not (step_dir / MANIFEST).exists() and not _has_manifests(step_dir.parent):
        return
    key, stats = step_dir.resolve(), _file_stats(step_dir)
    if _VERIFIED.get(key) == stats:
        return
    problems = checkpoint_problems(step_dir)
    if problems:
        intact = [t for t in reversed(step_tags(step_dir.parent))
                  if t != step_dir.name and not checkpoint_problems(step_dir.parent / t, checksums=False)]
        hint = f"; the newest other checkpoint with all its files is {step_dir.parent / intact[0]}" if intact else ""
        raise DamagedCheckpoint(f"checkpoint {step_dir} is damaged or incomplete: {'; '.join(problems)}{hint}")
    _VERIFIED[key] = stats


def resume_tag(directory: str | os.PathLike, strict: bool = False) -> tuple[str | None, list[str]]:
    """The tag to resume ``directory`` from, and warnings to print: the one ``latest`` names when intact; else
    the newest intact one (``strict``: ValueError instead). None when there is no checkpoint. ValueError naming
    every problem when no checkpoint is intact."""
    directory = Path(directory)
    named = latest_tag(directory)
    if named is None:
        return None, []
    if not _has_manifests(directory):  # written before manifests: nothing to verify against
        return named, []
    problems = checkpoint_problems(directory / named)
    if not problems:
        return named, []
    if strict:
        raise DamagedCheckpoint(f"checkpoint {directory / named} (named by {directory / LATEST}) is damaged or incomplete: "
                         f"{'; '.join(problems)}; --strict-resume refuses to fall back to an older one")
    warnings = [f"checkpoint {directory / named} is damaged or incomplete: {'; '.join(problems)}"]
    for tag in reversed(step_tags(directory)):
        if tag != named and tag_step(tag) < tag_step(named):
            if _from_before_manifests(directory, tag):
                warnings.append(f"resuming from {directory / tag}, written before manifests (not verified), instead")
                return tag, warnings
            found = checkpoint_problems(directory / tag)
            if not found:
                warnings.append(f"resuming from {directory / tag}, the newest intact checkpoint, instead")
                return tag, warnings
            warnings.append(f"checkpoint {directory / tag} is not intact either: {'; '.join(found)}")
    raise DamagedCheckpoint(f"no intact checkpoint in {directory}: {'; '.join(warnings)}; restore the files or start "
                     "a fresh run with another --save directory")


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` intact step directories (0 keeps all); never the one ``latest``
    names, never the newest intact one. Incomplete directories (a save that crashed, a truncated file) never
    count among the kept ones. Intact means all files present at their manifest sizes (no checksums: this runs
    after every save); directories from before manifests count as intact. Returns the tags removed."""
    if keep_last <= 0:
        return []
    directory = Path(directory)
    current = latest_tag(directory)
    tags = step_tags(directory)
    intact = [t for t in tags if _from_before_manifests(directory, t)
              or not checkpoint_problems(directory / t, checksums=False)]
    keep = set(intact[-keep_last:]) | {current}
    removed = []
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(directory / tag)
            removed.append(tag)
    return removed


__all__ = ["DamagedCheckpoint", "LATEST", "MANIFEST", "atomic_write_text", "checkpoint_problems", "latest_tag", "load_torch_file", "prune_checkpoints",
           "resume_tag", "rng_file", "saved_world_size", "step_tag", "step_tags", "tag_step", "torch_save_hashed",
           "verify_step_dir", "write_hashes_part", "write_manifest", "HashingWriter"]
