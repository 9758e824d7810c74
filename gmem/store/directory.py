"""The directory store: :class:`Store`, one memory directory's manifest, lock, files, verification,
repair and garbage collection (the rules are :mod:`gmem.store`'s), and the manifest's schema
(:func:`validate_manifest`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..atomic import atomic_write_bytes
from .files import (
    _HEX64,
    KNOWLEDGE_DIR,
    LOCK_NAME,
    MANIFEST,
    TASKS_DIR,
    KnowledgeFileError,
    LockTimeoutError,
    ManifestError,
    TaskConflictError,
    TaskFileError,
    check_knowledge_bytes,
    columns_lost,
    entry_path,
    index_without,
    inside,
    knowledge_bytes,
    no_links_below,
    prepare_directory,
    read_bytes_nofollow,
    read_knowledge,
    read_task,
    read_task_bytes,
    run_dir_name,
    sha256_bytes,
    task_file_info,
    task_file_name,
    validate_task_name,
    write_knowledge_file,
    write_task_file,
)
from .gc import GC_GRACE_SECONDS, RUNS_DIR, collect_garbage

FORMAT = "gmem-memory-v1"
LOCK_TIMEOUT = 60.0          # seconds a writer waits for another one to finish its manifest update


# ------------------------------------------------------------------------------------- manifest
def validate_manifest(manifest, path) -> dict:
    """Check a parsed manifest's structure; ManifestError naming the file and the field otherwise.

    Per-task file problems (missing/absolute ``file``, missing ``sha256``) are not checked here: they
    make that task unreadable (:func:`read_task`), not the memory.
    """
    def fail(field, problem):
        raise ManifestError(f"{path}: damaged manifest: field {field!r} {problem}")

    if not isinstance(manifest, dict):
        fail("(top level)", f"must be an object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        fail("format", f"is {manifest.get('format')!r}, expected {FORMAT!r}")
    base = manifest.get("base")
    if not isinstance(base, dict):
        fail("base", "is missing or not an object")
    if not isinstance(base.get("sha256"), str) or not _HEX64.fullmatch(base["sha256"]):
        fail("base.sha256", f"must be a SHA-256 hex string, got {base.get('sha256')!r}")
    if base.get("kind", "custom") not in ("default", "custom"):
        fail("base.kind", f"must be 'default' or 'custom', got {base.get('kind')!r}")
    if base.get("kind") != "default":
        try:
            inside(Path(path).parent, base.get("path", "base"), "base.path")
        except ManifestError as e:
            fail("base.path", f"is unusable: {e}")
    conv = manifest.get("conversion", {})
    if not isinstance(conv, dict):
        fail("conversion", "must be an object")
    for key in ("generator", "discriminator"):
        if key in conv and (not isinstance(conv[key], list) or not all(isinstance(g, str) for g in conv[key])):
            fail(f"conversion.{key}", "must be a list of strings")
    if "discriminator_fc_per_task" in conv and not isinstance(conv["discriminator_fc_per_task"], bool):
        fail("conversion.discriminator_fc_per_task", "must be true or false")
    knowledge = manifest.get("knowledge")
    if knowledge is not None and (not isinstance(knowledge, dict) or not isinstance(knowledge.get("file"), str)):
        fail("knowledge", "must be an object with 'file' and 'sha256'")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list):
        fail("tasks", "is missing or not a list")
    seen = set()
    for i, entry in enumerate(tasks):
        if not isinstance(entry, dict):
            fail(f"tasks[{i}]", "must be an object")
        try:
            validate_task_name(entry.get("name"))
        except (TypeError, ValueError) as e:
            fail(f"tasks[{i}].name", f"is invalid: {e}")
        if entry["name"] in seen:
            fail(f"tasks[{i}].name", f"repeats the task name {entry['name']!r}")
        seen.add(entry["name"])
        classes = entry.get("num_classes")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                    or not 1 <= classes <= 100_000):
            fail(f"tasks[{i}].num_classes", f"must be null or an int in 1..100000, got {classes!r}")
        for key in ("metrics", "training"):
            if not isinstance(entry.get(key, {}), dict):
                fail(f"tasks[{i}].{key}", "must be an object")
    return manifest


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created), refusing a symbolic link (ManifestError naming it)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ManifestError(f"{path} is a symbolic link; gmem does not follow links inside a memory directory "
                                "(it would write outside it): remove the link") from None
        raise


class Store:
    """The memory directory ``directory`` as a store: the one owner of its manifest, lock, task and
    knowledge files, verification, repair and garbage collection (the rules are the module docstring's).

    The interface other code uses is :class:`gmem.store.backend.StoreBackend`; this class is its
    directory implementation. Tasks are given as manifest entries (``name``, ``file``, ``sha256``, ...);
    task bytes come from :func:`gmem.store.files.task_bytes`.
    """

    def __init__(self, directory):
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"Store({str(self.directory)!r})"

    # ------------------------------------------------------------------ files
    def prepare(self) -> "Store":
        """Create the directory (and its parents) if needed; NotADirectoryError/PermissionError saying why."""
        self.directory = prepare_directory(self.directory)
        return self

    def inside(self, rel, field: str = "path") -> Path:
        """``directory / rel`` resolved, refused (ManifestError) if it leaves the directory."""
        return inside(self.directory, rel, field)

    def folder(self, rel, field: str = "path") -> Path:
        """:meth:`inside` for a folder: also refused (ManifestError naming it) if anything in it is a link."""
        path = self.inside(rel, field)
        no_links_below(self.directory, path)
        return path

    def entry_path(self, entry: dict) -> Path:
        """Where a manifest entry's task file is (confined to the directory)."""
        return entry_path(self.directory, entry)

    def write_task(self, name: str, data: bytes) -> tuple[str, str]:
        """Store a task file's bytes (content addressed, atomic); ``(relative path, sha256)``."""
        return write_task_file(self.directory, name, data)

    def read_task(self, name: str, entry: dict):
        """The tensors of task ``name``'s file, checked against its entry (TaskFileError naming it)."""
        return read_task(self.directory, name, entry)

    def read_task_bytes(self, name: str, entry: dict) -> bytes:
        """The checked bytes of task ``name``'s file."""
        return read_task_bytes(self.directory, name, entry)

    def read_knowledge(self, entry: dict) -> dict:
        """The knowledge-base layout named by the manifest's ``knowledge`` entry, checked."""
        return read_knowledge(self.directory, entry)

    def write_knowledge(self, data: bytes) -> tuple[str, str]:
        """Store a knowledge-base layout file's bytes; ``(relative path, sha256)``."""
        return write_knowledge_file(self.directory, data)

    def collect_garbage(self, *, manifest: Optional[dict] = None, grace: float = GC_GRACE_SECONDS,
                        removed=()) -> list[Path]:
        """:func:`gmem.store.gc.collect_garbage` on this directory (call it under :meth:`lock`); ``removed``:
        tasks just removed on request, whose run folders go with their checkpoints."""
        if manifest is None:
            manifest = self.read_manifest()
        return collect_garbage(self.directory, manifest=manifest, grace=grace, removed=removed)

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict:
        """The validated manifest of a memory directory (FileNotFoundError if there is none)."""
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a memory must be a directory, this is a file", str(directory))
        path = self.inside(MANIFEST, "manifest")
        if not path.is_file():
            raise FileNotFoundError(f"no GAN memory at {directory}: {MANIFEST} not found")
        try:
            manifest = json.loads(read_bytes_nofollow(path))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
            raise ManifestError(f"{path}: damaged manifest (not JSON: {e})") from None
        return validate_manifest(manifest, path)

    def _write_manifest(self, manifest: dict) -> None:
        directory = self.directory
        atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())

    # ------------------------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def lock(self, timeout: Optional[float] = None):
        """Hold the memory's writer lock (exclusive ``flock`` on ``<directory>/.lock``) inside the block.

        Waits up to ``timeout`` seconds (default :data:`LOCK_TIMEOUT`), then raises LockTimeoutError
        naming the process that holds it. The lock dies with its process: no stale lock files.
        """
        timeout = LOCK_TIMEOUT if timeout is None else timeout
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no GAN memory at {self.directory} (the directory does not exist)")
        path = self.inside(LOCK_NAME, "lock")
        fd = _open_lock(path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                        raise LockTimeoutError(f"{path}: another gmem process (pid {holder}) has been writing this "
                                               f"memory for more than {timeout:g} s; try again later") from None
                    time.sleep(0.02)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @contextlib.contextmanager
    def claim(self, name: str):
        """Mark task ``name`` as being learned into ``directory`` by this process (non-blocking flock).

        A second process claiming the same name while the first holds it gets TaskConflictError at once,
        before it trains anything. The claim file lives in the task's run directory.
        """
        directory = self.directory
        rel = f"{RUNS_DIR}/{run_dir_name(validate_task_name(name))}"
        while True:  # garbage collection may delete an abandoned run folder, claim file included, meanwhile
            run = self.inside(rel, "run folder")  # runs/ and the run folder: no links
            run.mkdir(parents=True, exist_ok=True)
            no_links_below(self.directory, run)  # samples/, log.jsonl, checkpoint.pt, .lock: no links either
            try:
                fd = _open_lock(run / LOCK_NAME)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise TaskConflictError(f"task {name!r} is being learned into {directory} by another process "
                                        f"(pid {holder}) right now; wait for it or pick another name") from None
            if os.fstat(fd).st_nlink:  # still the folder's claim file, not one just collected
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield run
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------- commit, GC
    def commit(self, base: dict, conversion: dict, put: Iterable[dict], *, refresh: Iterable[dict] = (),
               removed: Iterable[str] = (), known: Optional[dict] = None,
               before_write: Optional[Callable[[], None]] = None, version: str = "",
               timeout: Optional[float] = None, knowledge=(), known_knowledge=None) -> dict:
        """Merge this process's changes into the memory's manifest under the lock; returns the new manifest.

        ``put``: manifest entries (with ``file``/``sha256`` already stored) to add or update; ``removed``:
        names this process removed; ``known``: ``{name: sha256}`` of the tasks as this process last read
        them from this directory. ``refresh``: entries of tasks this process did not change (settings,
        metrics) applied only where the task still has the same ``sha256``; not re-added if another
        process removed them. Entries of other tasks are kept as they are. An entry whose name exists
        with other contents that this process did not know raises TaskConflictError (nothing written).
        ``before_write`` runs under the lock before the manifest is replaced (e.g. to store the base).
        ``knowledge``: the new ``{"file", "sha256"}`` of the knowledge-base file (None: no compressed tasks;
        omitted: keep the directory's). It is refused (TaskConflictError) when another process changed the
        directory's knowledge base since this one read ``known_knowledge`` (the knowledge bases are shared
        by all compressed tasks, so two writers cannot both grow them).
        """
        directory = self.directory
        known = dict(known or {})
        put = list(put)
        with self.lock(timeout):
            try:
                current = self.read_manifest()
            except FileNotFoundError:
                current = None
            if current is None:
                self._refuse_orphans(put)
            tasks = {e["name"]: e for e in current["tasks"]} if current else {}
            if current is not None:
                if current["base"]["sha256"] != base["sha256"]:
                    raise ManifestError(f"{directory / MANIFEST}: this directory holds a memory on another base "
                                        f"(sha256 {current['base']['sha256'][:12]}..., this memory's is "
                                        f"{base['sha256'][:12]}...); save to another directory")
                if current.get("conversion", conversion) != conversion:
                    raise ManifestError(f"{directory / MANIFEST}: this directory holds a memory with another "
                                        f"conversion ({current.get('conversion')}); save to another directory")
            for entry in put:
                name, old = entry["name"], tasks.get(entry["name"])
                if old is not None and old.get("sha256") != entry["sha256"] and known.get(name) != old.get("sha256"):
                    raise TaskConflictError(f"task {name!r} in {directory} was written by another process with other "
                                            "contents; nothing was saved (load the memory again, or use another name)")
            current_kb = current.get("knowledge") if current else None
            new_kb = current_kb if knowledge == () else knowledge
            if new_kb != current_kb and (current_kb or {}).get("sha256") != (known_knowledge or {}).get("sha256"):
                raise TaskConflictError(f"the knowledge base of {directory} (compressed tasks) was changed by another "
                                        "process; nothing was saved (load the memory again and redo the change)")
            dropped = [tasks.pop(n)["file"] for n in set(removed)
                       if n in tasks and isinstance(tasks[n].get("file"), str)]
            order = list(tasks)
            for entry in put:
                old = tasks.get(entry["name"])
                if old is not None and old.get("file") != entry["file"] and isinstance(old.get("file"), str):
                    dropped.append(old["file"])
                tasks[entry["name"]] = entry
                if entry["name"] not in order:
                    order.append(entry["name"])
            for entry in refresh:
                old = tasks.get(entry["name"])
                same = old is not None and old.get("sha256") == entry.get("sha256")
                if same and old.get("file") == entry.get("file"):
                    tasks[entry["name"]] = entry
            if before_write is not None:
                before_write()
            manifest = {"format": FORMAT, "gmem_version": version, "base": base, "conversion": conversion,
                        "tasks": [tasks[n] for n in order]}
            if new_kb:
                manifest["knowledge"] = new_kb
            self._write_manifest(manifest)
            self._touch_unreferenced(dropped, manifest)
            self.collect_garbage(manifest=manifest)
        return manifest

    def _refuse_orphans(self, put: list[dict]) -> None:
        """ManifestError when a directory without a manifest holds task files old enough for garbage
        collection (a lost manifest: writing a new one would let them be deleted); young files may be
        another first writer's, about to be committed."""
        found, _ = self.scan_task_files()
        ours = {e.get("file") for e in put}
        now = time.time()
        old = [f["file"] for f in found if f["file"] not in ours and now - f["mtime"] >= GC_GRACE_SECONDS]
        if old:
            raise ManifestError(f"{self.directory} has {len(old)} task files but no {MANIFEST} (e.g. {old[0]}); "
                                f"rebuild it from them with `gmem verify {self.directory} --repair` before saving "
                                "here (a new manifest would let them be deleted)")

    def _touch_unreferenced(self, files: list[str], manifest: dict) -> None:
        directory = self.directory
        """Start the grace period of files that just left the manifest (a reader may still be about to read them)."""
        referenced = {e.get("file") for e in manifest["tasks"]}
        for rel in files:
            if rel in referenced:
                continue
            with contextlib.suppress(ManifestError, OSError):
                os.utime(inside(directory, rel))

    # ------------------------------------------------------------------------------------- rebuilding
    def manifest_state(self) -> str:
        """``"ok"``, ``"missing"`` or ``"damaged"``: whether the manifest can be read."""
        try:
            self.read_manifest()
            return "ok"
        except FileNotFoundError:
            return "missing"
        except ManifestError:
            return "damaged"

    def scan_task_files(self) -> tuple[list[dict], dict[str, str]]:
        """The task files in ``tasks/`` that are whole: ``([{name, file, sha256, entry, shapes, mtime}],
        {file: why not usable})`` (a file is whole when its name carries the SHA-256 of its bytes and
        its metadata names its task; links are never followed)."""
        found, bad = [], {}
        try:
            tasks = self.inside(TASKS_DIR, "tasks directory")
        except ManifestError as e:
            return [], {TASKS_DIR: str(e)}
        for path in sorted(tasks.glob("*.safetensors")) if tasks.is_dir() else []:
            rel = f"{TASKS_DIR}/{path.name}"
            try:
                data = read_bytes_nofollow(self.inside(rel, "task file"))
                digest = sha256_bytes(data)
                name, entry, shapes = task_file_info(data)
                if rel != task_file_name(name, digest):
                    raise ValueError(f"its bytes (sha256 {digest[:16]}...) do not match its name: damaged")
            except (OSError, ValueError, TypeError, ManifestError) as e:
                bad[rel] = str(e)
                continue
            found.append({"name": name, "file": rel, "sha256": digest, "entry": entry, "shapes": shapes,
                          "mtime": path.lstat().st_mtime})
        return found, bad

    def scan_knowledge_files(self) -> list[dict]:
        """The whole knowledge-base files: ``[{file, sha256, index, mtime}]``."""
        out = []
        try:
            folder = self.inside(KNOWLEDGE_DIR, "knowledge directory")
        except ManifestError:
            return out
        for path in sorted(folder.glob("knowledge-*.json")) if folder.is_dir() else []:
            rel = f"{KNOWLEDGE_DIR}/{path.name}"
            try:
                data = read_bytes_nofollow(self.inside(rel, "knowledge file"))
                digest = sha256_bytes(data)
                if path.name != f"knowledge-{digest[:16]}.json":
                    continue
                out.append({"file": rel, "sha256": digest, "index": check_knowledge_bytes(data, path),
                            "mtime": path.lstat().st_mtime})
            except (OSError, ValueError, ManifestError, KnowledgeFileError):
                continue
        return out

    def replace_manifest(self, manifest: dict, *, timeout: Optional[float] = None) -> dict:
        """Write a rebuilt ``manifest`` (validated) under the lock, only where the present one is missing
        or damaged (ManifestError otherwise: a readable manifest is never replaced wholesale)."""
        validate_manifest(manifest, self.directory / MANIFEST)
        with self.lock(timeout):
            if self.manifest_state() == "ok":
                raise ManifestError(f"{self.directory / MANIFEST} is readable; it is not rebuilt (use "
                                    f"`gmem verify {self.directory} --repair` to drop damaged tasks)")
            self._write_manifest(manifest)
        return manifest

    # ------------------------------------------------------------------------------------- maintenance
    def verify_files(self) -> dict[str, Optional[str]]:
        """``{task: None or what is wrong}`` for every task of the manifest: confinement, hash, safetensors header."""
        directory = self.directory
        out = {}
        for entry in self.read_manifest()["tasks"]:
            try:
                read_task(directory, entry["name"], entry)
                out[entry["name"]] = None
            except TaskFileError as e:
                out[entry["name"]] = str(e)
        return out

    def remove_tasks(self, names: Iterable[str], *, timeout: Optional[float] = None) -> list[str]:
        """Drop tasks from the manifest under the lock (files are left to garbage collection); returns those dropped.

        Compressed tasks leave the knowledge-base layout too; removing one whose basis columns later
        compressed tasks use is refused (ValueError naming them) and nothing changes.
        """
        directory = self.directory
        names = list(names)
        with self.lock(timeout):
            manifest = self.read_manifest()
            have = {e["name"] for e in manifest["tasks"]}
            missing = [n for n in names if n not in have]
            if missing:
                raise KeyError(f"no task {missing[0]!r} in {directory}; its tasks are {sorted(have)}")
            dropped = [e.get("file") for e in manifest["tasks"] if e["name"] in names]
            if manifest.get("knowledge"):  # compressed tasks: refused while later tasks use their columns
                index = index_without(read_knowledge(directory, manifest["knowledge"]), names)
                dropped.append(manifest.pop("knowledge")["file"])
                if index["matrices"]:
                    rel, digest = write_knowledge_file(directory, knowledge_bytes(index))
                    manifest["knowledge"] = {"file": rel, "sha256": digest}
            manifest["tasks"] = [e for e in manifest["tasks"] if e["name"] not in names]
            self._write_manifest(manifest)
            self._touch_unreferenced([f for f in dropped if isinstance(f, str)], manifest)
            self.collect_garbage(manifest=manifest, removed=names)
        return names

    def repair(self, *, also: Optional[dict] = None, timeout: Optional[float] = None) -> dict[str, str]:
        """Drop every task whose file cannot be read (checked again under the lock); ``{task: problem}`` dropped.

        ``also``: ``{task: sha256}`` of tasks found unusable otherwise (e.g. a file that does not fit the
        base); each is dropped too if its entry still has that hash.
        """
        directory = self.directory
        also = dict(also or {})
        with self.lock(timeout):
            manifest = self.read_manifest()
            bad = {}
            for entry in manifest["tasks"]:
                try:
                    read_task(directory, entry["name"], entry)
                    if entry["name"] in also and also[entry["name"]] == entry.get("sha256"):
                        bad[entry["name"]] = "contents do not fit the memory"
                except TaskFileError as e:
                    bad[entry["name"]] = str(e)
            if bad and manifest.get("knowledge"):  # compressed: the knowledge-base file must follow
                try:
                    index = read_knowledge(directory, manifest["knowledge"])
                except KnowledgeFileError:
                    index = None  # a damaged knowledge file is reported by verify; leave it as it is
                if index is not None:
                    bad.update(columns_lost(index, bad))
                    dropped = manifest.pop("knowledge")["file"]
                    index = index_without(index, bad)
                    if index["matrices"]:
                        rel, digest = write_knowledge_file(directory, knowledge_bytes(index))
                        manifest["knowledge"] = {"file": rel, "sha256": digest}
                    if manifest.get("knowledge", {}).get("file") != dropped:
                        self._touch_unreferenced([dropped], manifest)
            if bad:
                manifest["tasks"] = [e for e in manifest["tasks"] if e["name"] not in bad]
                self._write_manifest(manifest)
        return bad

