"""Task files of a GAN memory: names, confinement, deterministic content-addressed bytes, checked reads.

The file-level half of :mod:`gmem.store` (which re-exports everything here); see it for the rules.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_write_bytes
from ..hashing import file_digest
from ..models import CheckpointError

MANIFEST = "manifest.json"
TASK_FORMAT = "gmem-task-v1"
TASKS_DIR = "tasks"
LOCK_NAME = ".lock"  # the writers' lock of a memory, and a learner's claim in its run folder
MAX_NAME_LENGTH = 128
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TaskFileError(CheckpointError):
    """A task file that is missing or damaged; the message names the file and the task."""


class ManifestError(CheckpointError):
    """A manifest that cannot be used; the message names the file and the field."""


class LockTimeoutError(CheckpointError):
    """Another process held the memory's lock for longer than the timeout."""


class TaskConflictError(CheckpointError):
    """Another process wrote a different task under the same name; nothing was saved."""


# ------------------------------------------------------------------------------------- names, paths
def validate_task_name(name) -> str:
    """``name`` if it is a valid task name, else ValueError/TypeError saying why.

    Valid: a non-empty str of at most :data:`MAX_NAME_LENGTH` characters, not ``"source"`` (the
    base), without ``/`` or ``\\``, control characters (NUL included) or a leading dot.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if not name or not name.strip():
        raise ValueError("task name must not be empty")
    if name == "source":
        raise ValueError("task name 'source' is reserved for the base")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"task name is {len(name)} characters long, at most {MAX_NAME_LENGTH} are allowed")
    if "/" in name or "\\" in name:
        raise ValueError(f"task name {name!r} contains a path separator ('/' or '\\')")
    bad = [c for c in name if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"]
    if bad:
        raise ValueError(f"task name {name!r} contains control characters ({', '.join(repr(c) for c in bad[:3])})")
    if name.startswith("."):
        raise ValueError(f"task name {name!r} starts with a dot")
    return name


def _stem(name: str) -> str:
    """A file-name-safe stem of a task name (letters, digits, ``_-``; at most 40 characters)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "task"


def task_file_name(name: str, digest: str) -> str:
    """Manifest-relative path of a task file: ``tasks/<stem>-<sha256[:16]>.safetensors``."""
    return f"{TASKS_DIR}/{_stem(name)}-{digest[:16]}.safetensors"


def run_dir_name(name: str) -> str:
    """Directory name (under ``runs/``) for a task's progress files: stem + hash of the full name."""
    return f"{_stem(name)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def inside(directory, rel, field: str = "path") -> Path:
    """``directory / rel`` (the directory resolved), if it stays inside ``directory`` and no part of it
    below the directory is a symbolic link; else ManifestError naming the link.

    Nothing the store reads or writes may leave the memory directory, so a link anywhere on the way
    (``tasks/``, ``runs/``, ``base/``, a task file...) is refused rather than followed, even one that
    points inside the directory. The memory directory itself may be reached through links.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ManifestError(f"{field} must be a non-empty relative path, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith("\\"):
        raise ManifestError(f"{field} {rel!r} is an absolute path; paths in a memory are relative to it")
    root = Path(directory).resolve()
    path = Path(os.path.normpath(root / rel))
    if path != root and root not in path.parents:
        raise ManifestError(f"{field} {rel!r} resolves to {path}, outside the memory directory {root}")
    refuse_links(root, path)
    return path


def refuse_links(root: Path, path: Path) -> None:
    """ManifestError if ``path`` (below the resolved directory ``root``) or a folder on the way to it is a
    symbolic link (the store never follows one: it could lead outside the memory)."""
    for part in [path, *path.parents]:
        if part == root or root not in part.parents:
            break
        if part.is_symlink():
            raise ManifestError(f"{part} is a symbolic link; gmem does not follow links inside a memory directory "
                                f"(it could read or write outside it): replace it by the file or folder itself")


def no_links_below(root, folder: Path) -> None:
    """ManifestError naming the first symbolic link in ``folder`` or anywhere below it (not followed)."""
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            refuse_links(Path(root).resolve(), Path(top) / name)


def read_bytes_nofollow(path: Path) -> bytes:
    """The bytes of ``path``, refusing (ManifestError) a symbolic link in its last part (``O_NOFOLLOW``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ManifestError(f"{path} is a symbolic link; gmem does not follow links inside a memory "
                                "directory (it could read outside it): replace it by the file itself") from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def entry_path(directory, entry: dict) -> Path:
    """The (unchecked) path a manifest entry names, for messages and bookkeeping."""
    return Path(directory) / str(entry.get("file", ""))


# ------------------------------------------------------------------------------------- bytes, files
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


#: the parts of a task's manifest entry its file carries too (``entry`` metadata), so that a lost or
#: damaged manifest can be rebuilt from the task files (:func:`task_file_info`); all deterministic
#: (no timings), so equal tasks still give equal bytes
ENTRY_IN_FILE = ("num_classes", "classes", "compression", "training")


def task_bytes(tensors: dict[str, Tensor], task: str, entry: dict | None = None) -> bytes:
    """Deterministic safetensors bytes of a task's tensors: equal tensors give equal bytes in any process.

    The header is JSON with sorted keys (safetensors itself writes metadata in a per-process random
    order), tensors are laid out in name order; :func:`safetensors.torch.load` reads the result.
    The metadata names the task and (``entry``) the :data:`ENTRY_IN_FILE` parts of its manifest entry.
    """
    header: dict = {"__metadata__": {"format": TASK_FORMAT, "task": task}}
    if entry:
        kept = {k: entry[k] for k in ENTRY_IN_FILE if k in entry}
        header["__metadata__"]["entry"] = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"{key}: cannot store dtype {t.dtype}")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    return file_digest(path, "sha256")


def prepare_directory(directory) -> Path:
    """Create ``directory`` and its ``tasks/`` (refusing a ``tasks`` that leads outside); returns the directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a memory must be a directory, this is a file", str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    tasks = inside(directory, TASKS_DIR, "tasks directory")
    if tasks.exists() and not tasks.is_dir():
        raise ManifestError(f"{directory / TASKS_DIR} is not a directory")
    tasks.mkdir(exist_ok=True)
    return directory


def write_task_file(directory, name: str, data: bytes) -> tuple[str, str]:
    """Store a task's bytes; returns ``(manifest-relative file, sha256)``. Present files are not rewritten.

    A present file gets its modification time refreshed, so garbage collection (which spares young
    files) cannot remove it before the manifest that references it again is written.
    """
    digest = sha256_bytes(data)
    rel = task_file_name(name, digest)
    path = inside(directory, rel, "task file")
    if path.is_file() and sha256_file(path) == digest:
        os.utime(path)
    else:
        atomic_write_bytes(path, data)
    return rel, digest


def _read_checked(directory, entry: dict, field: str, owner: str, error: type) -> bytes:
    """The bytes of the file ``entry`` names (``file``, ``sha256``), confined to the memory and checked
    against its SHA-256; ``error`` (a TaskFileError) starting with ``owner`` and naming the file if not.
    ``field``: the entry's place in the manifest (``""`` for a task, ``"knowledge."``)."""
    shown = entry_path(directory, entry)
    try:
        path = inside(directory, entry.get("file"), f"{field}file")
    except ManifestError as e:
        raise error(f"{owner}: unusable manifest entry: {e}") from None
    expected = entry.get("sha256")
    if not isinstance(expected, str) or not _HEX64.fullmatch(expected):
        raise error(f"{owner}: manifest field '{field}sha256' is missing or not a SHA-256 "
                    f"({expected!r}), so {shown} cannot be checked")
    if not path.is_file():
        raise error(f"{owner}: file missing: {shown}")
    try:
        data = read_bytes_nofollow(path)
    except ManifestError as e:
        raise error(f"{owner}: {e}") from None
    digest = sha256_bytes(data)
    if digest != expected:
        k = max(12, next(i for i, (a, b) in enumerate(zip(digest, expected)) if a != b) + 4)  # prefixes that differ
        raise error(f"{owner}: damaged file {shown} (sha256 {digest[:k]}... does not match "
                    f"{expected[:k]}... in {MANIFEST})")
    return data


def read_task_bytes(directory, name: str, entry: dict) -> bytes:
    """The checked bytes of a task file (inside the memory, SHA-256 as the manifest says); TaskFileError if not."""
    return _read_checked(directory, entry, "", f"task {name!r}", TaskFileError)


def read_task(directory, name: str, entry: dict) -> dict[str, Tensor]:
    """A task's tensors from its checked file; TaskFileError naming the file if anything is wrong."""
    data = read_task_bytes(directory, name, entry)
    try:
        from safetensors.torch import load as st_load

        return st_load(data)
    except Exception as e:  # safetensors raises its own error types for damaged data
        raise TaskFileError(f"task {name!r}: cannot read {entry_path(directory, entry)}: {e}") from None


def task_file_info(data: bytes) -> tuple[str, dict, dict]:
    """``(task name, entry parts, {tensor: shape})`` from a task file's bytes (its safetensors header);
    ValueError if it is not a task file."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header longer than the file")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise ValueError(f"header is not JSON ({e})") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT or not isinstance(meta.get("task"), str):
        raise ValueError(f"not a {TASK_FORMAT} file (no task name in its metadata)")
    try:
        entry = json.loads(meta.get("entry", "{}"))
    except (ValueError, TypeError, RecursionError):
        entry = {}
    entry = {k: v for k, v in entry.items() if k in ENTRY_IN_FILE} if isinstance(entry, dict) else {}
    shapes = {k: v.get("shape") for k, v in header.items() if isinstance(v, dict)}
    return validate_task_name(meta["task"]), entry, shapes


# ------------------------------------------------------------------------------------- knowledge base
KNOWLEDGE_DIR = "knowledge"
KNOWLEDGE_FORMAT = "gmem-knowledge-v1"


class KnowledgeFileError(TaskFileError):
    """The knowledge-base file of a memory with compressed tasks is missing or damaged (the message names it)."""


def knowledge_bytes(index: dict) -> bytes:
    """Deterministic bytes of a knowledge-base index (JSON, sorted keys)."""
    return (json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n").encode()


def write_knowledge_file(directory, data: bytes) -> tuple[str, str]:
    """Store a knowledge-base index; returns ``(manifest-relative file, sha256)`` (content addressed,
    ``knowledge/knowledge-<sha16>.json``, atomic; a present file is not rewritten, only touched)."""
    digest = sha256_bytes(data)
    rel = f"{KNOWLEDGE_DIR}/knowledge-{digest[:16]}.json"
    path = inside(directory, rel, "knowledge file")
    path.parent.mkdir(exist_ok=True)
    if path.is_file() and sha256_file(path) == digest:
        os.utime(path)
    else:
        atomic_write_bytes(path, data)
    return rel, digest


def check_knowledge_bytes(data: bytes, shown) -> dict:
    """The knowledge-base index in ``data`` (a knowledge file's bytes), checked; KnowledgeFileError if not."""
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise KnowledgeFileError(f"knowledge base: damaged file {shown}: not JSON ({e})") from None
    return _check_index(index, shown)


def _check_index(index, shown) -> dict:
    def fail(problem):
        raise KnowledgeFileError(f"knowledge base: damaged file {shown}: {problem}")

    if not isinstance(index, dict) or index.get("format") != KNOWLEDGE_FORMAT:
        fail(f"format is not {KNOWLEDGE_FORMAT!r}")
    mats = index.get("matrices")
    if not isinstance(mats, dict):
        fail("'matrices' is missing or not an object")
    for key, mat in mats.items():
        if not isinstance(mat, dict) or not isinstance(mat.get("tasks"), list):
            fail(f"matrix {key!r} has no task list")
        shape = mat.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            fail(f"matrix {key!r} has a bad shape {shape!r}")
        expected = 0
        for row in mat["tasks"]:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in row[1:])):
                fail(f"matrix {key!r} has a bad task row {row!r}")
            if row[1] != expected:
                fail(f"matrix {key!r}: task {row[0]!r} starts at column {row[1]}, expected {expected}")
            expected += row[2]
    return index


def read_knowledge(directory, entry: dict) -> dict:
    """The checked knowledge-base index named by the manifest's ``knowledge`` entry; KnowledgeFileError if not."""
    shown = entry_path(directory, entry if isinstance(entry, dict) else {})
    if not isinstance(entry, dict):
        raise KnowledgeFileError(f"knowledge base: manifest field 'knowledge' must be an object, got {entry!r}")
    data = _read_checked(directory, entry, "knowledge.", "knowledge base", KnowledgeFileError)
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise KnowledgeFileError(f"knowledge base: damaged file {shown} (not JSON: {e})") from None
    return _check_index(index, shown)


def columns_lost(index: dict, names) -> dict[str, str]:
    """``{task: reason}`` of the compressed tasks that cannot be read without the tasks ``names``.

    A task's basis columns are stored in its own file, and every later task of a matrix uses all the
    columns before its own: dropping a task that added columns (rank > 0) loses them for the later
    tasks of that matrix too. Tasks that added no columns are no loss to anyone.
    """
    lost: dict[str, str] = {}
    gone = set(names)
    changed = True
    while changed:  # a lost task may itself have added columns that later tasks of another matrix use
        changed = False
        for key, mat in index["matrices"].items():
            rows = mat["tasks"]
            for i, (name, _, rank) in enumerate(rows):
                if name in gone and rank > 0:
                    for later in rows[i + 1:]:
                        if later[0] not in gone:
                            lost[later[0]] = f"uses the basis columns of dropped task {name!r} ({key})"
                            gone.add(later[0])
                            changed = True
    return lost


def index_without(index: dict, names) -> dict:
    """``index`` without the tasks ``names``; ValueError naming the tasks that use their columns."""
    names = set(names)
    out = {"format": index["format"], "matrices": {}}
    for key, mat in index["matrices"].items():
        rows = mat["tasks"]
        for i, (name, _, rank) in enumerate(rows):
            if name in names and rank > 0:
                users = [r[0] for r in rows[i + 1:] if r[0] not in names]
                if users:
                    raise ValueError(f"cannot remove task {name!r}: later compressed tasks {users} use the basis "
                                     f"columns it added to the knowledge base ({key}); remove them first")
        kept = [r for r in rows if r[0] not in names]
        if kept:
            out["matrices"][key] = dict(mat, tasks=kept)
    return out
