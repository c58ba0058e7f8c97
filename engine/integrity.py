"""Checkpoint integrity: a digest of every file, written before COMPLETE, checked before a checkpoint is used.

Every checkpoint holds MANIFEST.json: each file's path (relative to the checkpoint), size and the xxh3-128
digests of its 64 MiB chunks (chunks, so that the ranks and a few threads can check one large file
together). Who hashes what, during a save (`checkpoint.Checkpointer.save`):

- files the engine writes itself (the DDP model and optimizer, every rank's RNG state, trainer_state.json)
  are hashed WHILE they are written (`save_torch`, `save_safetensors`, `write_bytes`): no second pass;
- files a backend's library writes itself (DeepSpeed's, DCP's) are hashed by the rank that wrote them,
  right after writing, from the page cache: the backend calls `record(path)` for each;
- whatever nobody recorded (the tokenizer, small files a library adds on the side) is listed by rank 0
  once every rank's files are in place and hashed by all ranks, split by size (`balance`).
Rank 0 merges the digests into MANIFEST.json before COMPLETE. A backend that records nothing is still
covered completely, by the last rule; recording only moves the work to the rank that wrote the file.

Verification (resume, `ftl export`) hashes every listed chunk again (mapped into memory, no copy; split
across ranks by size, and across up to 4 threads in a rank: xxhash releases the GIL) and compares sizes
and digests; it also parses what is cheap to parse (trainer_state.json, the manifest, safetensors headers, the zip
directory of .pt files), which is all a checkpoint written before digests existed gets. RNG files are
optional: a missing one is reported by the loader as a warning (the resume is no longer bit-exact),
a changed one is damage like any other.

xxh3-128 (the `xxhash` package, a dependency of `datasets`) runs at 8.8 GB/s on one core of the
project's CPU machine, sha256 at 1.45 GB/s. It detects corruption (flipped bits, truncation, a torn
copy), not deliberate tampering by someone who can also rewrite the manifest.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

MANIFEST = "MANIFEST.json"
ALGORITHM = "xxh3_128"
OPTIONAL_PREFIXES = ("rng-rank",)  # may be missing: the loader reseeds that rank and warns
CHUNK_BYTES = 64 << 20  # a multiple of the page size: chunks are mapped at their offset
THREADS = max(1, min(4, os.cpu_count() or 1))

# Safetensors dtype codes (the format's spec); float8 types where this torch has them.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


# ------------------------------------------------------------------------------------------ digests

def new_hasher():
    return xxhash.xxh3_128()


class ChunkHasher:
    """The digests of consecutive CHUNK_BYTES pieces of a byte stream, fed in pieces of any size."""

    def __init__(self):
        self.chunks: list[str] = []
        self.size = 0
        self._h, self._filled = new_hasher(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(CHUNK_BYTES - self._filled, len(view))
            self._h.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self.chunks.append(self._h.hexdigest())
                self._h, self._filled = new_hasher(), 0

    def entry(self) -> dict:
        tail = [self._h.hexdigest()] if self._filled or not self.chunks else []
        return {"size": self.size, "chunk_bytes": CHUNK_BYTES, ALGORITHM: self.chunks + tail}


def n_chunks(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


def hash_chunk(path: Path, index: int) -> str:
    """The digest of chunk `index` of a file, hashed straight from the mapped file (no copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = index * CHUNK_BYTES
        length = max(0, min(CHUNK_BYTES, size - start))
        h = new_hasher()
        if length:
            with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as m:
                h.update(m)
        return h.hexdigest()


def hash_file(path: Path) -> dict:
    """Size and chunk digests of a file (chunks in parallel threads)."""
    size = Path(path).stat().st_size
    with ThreadPoolExecutor(THREADS) as pool:
        chunks = list(pool.map(lambda i: hash_chunk(path, i), range(n_chunks(size))))
    return {"size": size, "chunk_bytes": CHUNK_BYTES, ALGORITHM: chunks}


class _Recorder:
    """The digests of the files this rank wrote under `root` during one save."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files: dict[str, dict] = {}

    def add(self, path: Path, digest: dict | None) -> None:
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:  # written outside the checkpoint: not ours to list
            return
        self.files[rel] = digest if digest is not None else hash_file(Path(path))


# Per thread: a save records what the thread that calls it writes (every writer here, and DeepSpeed's
# save_checkpoint, write in the calling thread). A file written elsewhere is not lost, only hashed later,
# with the files nobody recorded.
_local = threading.local()


@contextlib.contextmanager
def recording(root: Path):
    """Collect the digests of the files written under `root` (by `record` and the writers below)."""
    previous = getattr(_local, "recorder", None)
    _local.recorder = _Recorder(root)
    try:
        yield _local.recorder
    finally:
        _local.recorder = previous


def record(path: Path, digest: dict | None = None) -> None:
    """A backend wrote `path` (a file its library wrote): hash it now, while it is in the page cache.
    Outside a checkpoint save this does nothing."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.add(Path(path), digest)


class _HashingFile:
    """A binary file that hashes what is written to it; a write error names the file."""

    def __init__(self, f, path: Path):
        self._f, self.path = f, path
        self.hasher = ChunkHasher()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        try:
            self._f.write(view)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        return len(view)

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def hashed_writer(path: Path):
    """Open `path` for writing; its digest is recorded when the block ends without an error."""
    path = Path(path)
    try:
        f = open(path, "wb")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    w = _HashingFile(f, path)
    try:
        yield w
        try:
            f.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        try:
            f.close()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    record(path, w.hasher.entry())


def write_bytes(path: Path, data: bytes) -> None:
    with hashed_writer(path) as f:
        f.write(data)


def save_torch(obj, path: Path) -> None:
    """torch.save, hashed while written (the zip writer streams through our file object)."""
    with hashed_writer(path) as f:
        torch.save(obj, f)


def dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share storage (a tied embedding) are stored once, under the first name (sorted)
    that covers the whole storage, as safetensors' own save_model does; returns (kept, removed -> kept)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
    kept, removed = {}, {}
    for names in groups.values():
        names = sorted(names)
        full = [n for n in names if tensors[n].data_ptr() == tensors[n].untyped_storage().data_ptr()
                and tensors[n].numel() * tensors[n].element_size() == tensors[n].untyped_storage().nbytes()]
        keep = (full or names)[0]
        kept[keep] = tensors[keep]
        for n in names:
            if n != keep:
                removed[n] = keep
    return kept, removed


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written by streaming each tensor's bytes (one tensor in host memory at a time),
    hashed while written, with the permissions of every other file (0666 minus the umask; safetensors'
    own writer leaves 0600). The layout is the format's: u64 header length, JSON header padded to 8 bytes,
    then the data, largest element size first so every tensor stays aligned."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {}
    offset = 0
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with hashed_writer(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            if t.numel():
                flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(flat.numpy())


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a readable safetensors file (truncated, bad header), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{size} bytes: too short for a safetensors header (truncated)"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                return f"its header claims {n} bytes but the file has {size} (truncated or not safetensors)"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable safetensors header ({e})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        return f"{size} bytes, its header describes {8 + n + end} (truncated or padded)"
    return None


# ---------------------------------------------------------------------------------------- manifest

def write_manifest(directory: Path, files: dict[str, dict]) -> bytes:
    """The manifest's bytes (written by the caller, atomically, before COMPLETE)."""
    doc = {"format": 1, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def read_manifest(directory: Path) -> tuple[dict[str, dict] | None, str | None]:
    """(files, problem): (None, None) for a checkpoint written before digests existed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"unknown algorithm {doc.get('algorithm')!r}")
        return files, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST}: unreadable ({e})"


def unlisted_files(directory: Path, listed) -> list[tuple[str, int]]:
    """(relative path, size) of the files under `directory` that are not in `listed` (nor the markers)."""
    out = []
    root = Path(directory)
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in listed or rel in (MANIFEST, "COMPLETE"):
                continue
            out.append((rel, p.stat().st_size))
    return sorted(out)


def balance(sized: list[tuple], world: int) -> list[list]:
    """Items (name, size) split across `world` ranks so the bytes each hashes are about equal (largest
    first, each to the least loaded rank); deterministic, so every rank computes the same split."""
    shares: list[list] = [[] for _ in range(world)]
    load = [0] * world
    for item in sorted(sized, key=lambda x: (-x[-1], x[:-1])):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(item[0] if len(item) == 2 else item[:-1])
        load[r] += item[-1]
    return shares


# ------------------------------------------------------------------------------------ verification

def work_items(listed: dict[str, dict] | None, sized: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(file, chunk, bytes) to check: every chunk of every listed file (a file without digests: chunk 0,
    which stands for parsing it)."""
    if listed is None:
        return [(rel, 0, size) for rel, size in sized]
    items = []
    for rel, e in listed.items():
        items += [(rel, i, min(CHUNK_BYTES, max(0, int(e["size"]) - i * CHUNK_BYTES)) or 1)
                  for i in range(max(1, len(e.get(ALGORITHM) or [])))]
    return items


def check_items(directory: Path, items: list[tuple[str, int]], listed: dict[str, dict] | None) -> list[str]:
    """Problems with (file, chunk) items under `directory`: missing, wrong size, a chunk's digest differs,
    unparsable. Chunk 0 of a file also checks its existence, size and format."""
    def check(item) -> str | None:
        rel, index = item
        p = Path(directory) / rel
        want = (listed or {}).get(rel)
        try:
            if index == 0:
                if not p.is_file():
                    return None if Path(rel).name.startswith(OPTIONAL_PREFIXES) else f"{rel}: missing"
                size = p.stat().st_size
                if want is not None and size != want["size"]:
                    return f"{rel}: {size} bytes, saved with {want['size']} (truncated or overwritten)"
            elif not p.is_file() or (want is not None and p.stat().st_size != want["size"]):
                return None  # chunk 0 reports it
            if want is not None:
                digests = want[ALGORITHM]
                if want.get("chunk_bytes") != CHUNK_BYTES or index >= len(digests):
                    return f"{rel}: its manifest entry is not one this engine writes"
                if hash_chunk(p, index) != digests[index]:
                    return (f"{rel}: its content differs from the digest recorded when it was saved (bytes "
                            f"{index * CHUNK_BYTES}-{min((index + 1) * CHUNK_BYTES, want['size'])} changed on disk)")
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror or e})"
        if index == 0 and rel.endswith(".safetensors"):
            why = safetensors_problem(p)
            if why:
                return f"{rel}: {why}"
        elif index == 0 and want is None and rel.endswith(".pt") and not zipfile.is_zipfile(p):
            return f"{rel}: not a readable torch file (truncated?)"
        return None

    with ThreadPoolExecutor(THREADS) as pool:
        return [p for p in pool.map(check, items) if p]


def state_problem(directory: Path, state_name: str) -> str | None:
    """Why trainer_state.json cannot be used (not JSON, not an object, no step), or None."""
    try:
        state = json.loads((Path(directory) / state_name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return f"{state_name}: unreadable ({e})"
    except ValueError as e:
        return f"{state_name}: not valid JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{state_name}: not a trainer state (no integer 'step')"
    return None


def plan(directory: Path, state_name: str) -> tuple[dict[str, dict] | None, list[tuple[str, int, int]], list[str]]:
    """What verifying `directory` involves: (listed files or None, (file, chunk, bytes) items to check,
    problems found without reading any file's content: the manifest and the trainer state)."""
    problems = []
    listed, why = read_manifest(directory)
    if why:
        problems.append(why)
    why = state_problem(directory, state_name)
    if why:
        problems.append(why)
    sized = unlisted_files(directory, ()) if listed is None else []  # written before digests: parse them
    return listed, work_items(listed, sized), problems
