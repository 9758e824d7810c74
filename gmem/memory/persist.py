"""Saving and loading a :class:`gmem.GANMemory` (the facade's persistence; the file rules are :mod:`gmem.store`).

:func:`save_memory` turns the memory's tasks into content-addressed task files and merges them into
the directory's manifest (:meth:`gmem.store.Store.commit`); :func:`load_memory` opens a directory with
every task pending (read lazily on first use); :func:`verify_tasks` reads the pending ones. What a
memory knows about its store is a :class:`StoreLink` (``mem.link``), which this module writes.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..models import CheckpointError, Discriminator, Generator, load_base, load_default_base, save_base
from ..models.base import base_config
from ..store import MANIFEST, Store, StoreBackend, TaskFileError, task_bytes
from . import compression
from .registry import D_MODULATED, G_MODULATED, base_state

__all__ = ["StoreLink", "state_hash", "save_memory", "save_base_once", "load_memory", "verify_tasks",
           "rebuild_manifest"]


@dataclass
class StoreLink:
    """What a memory knows about the store it was loaded from or last saved to (written by this module).

    ``store``: that store (None: never loaded or saved); ``on_disk``: ``{task: sha256}`` as last read
    or written there; ``knowledge_entry``: the manifest's knowledge-base entry (compressed tasks);
    ``knowledge_dirty``: the knowledge bases changed since (set by learning, compressing, removing);
    ``knowledge_cache``: ``(sha256, index)`` of the knowledge-base file, read once.
    """

    store: Optional[StoreBackend] = None
    on_disk: dict = field(default_factory=dict)
    knowledge_entry: Optional[dict] = None
    knowledge_dirty: bool = False
    knowledge_cache: Optional[tuple] = None

    def same(self, store: Store) -> bool:
        """Whether ``store`` is the directory this memory was loaded from / saved to."""
        return (isinstance(self.store, Store) and isinstance(store, Store)
                and self.store.directory.resolve() == store.directory.resolve())


def state_hash(*named_states: tuple[str, dict]) -> str:
    """SHA-256 of state dicts' float32 contents (keys, shapes and values), independent of file format.

    The identity of a base in the manifest (``base.sha256``): a memory's tasks load only on that base.
    """
    h = hashlib.sha256()
    for prefix, state in named_states:
        for key in sorted(state):
            t = state[key].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{prefix}{key}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _base_entry(mem) -> dict:
    """The manifest's ``base`` entry of ``mem``: kind, hash, architecture (and where a custom base is stored)."""
    entry = {"kind": mem.base_source.get("kind", "custom"), "sha256": mem.base_hash,
             "generator": mem.generator.config(), "discriminator": mem.discriminator.config()}
    if entry["kind"] == "default":
        entry["file_sha256"] = mem.base_source.get("file_sha256")
    else:
        entry["path"] = "base"
    return entry


def save_memory(mem, directory) -> Path:
    """:meth:`GANMemory.save`: write the task files, then merge them into the manifest under the lock."""
    store = Store(directory).prepare()
    directory = store.directory
    link, pending = mem.link, mem.registry.pending
    same = link.same(store)
    known = dict(link.on_disk) if same else {}
    base_entry = _base_entry(mem)
    put, refresh = [], []
    for task in mem.registry.order:
        record = mem.records[task]
        counts = {"style_parameters": mem.parameter_counts(task)["total"]}
        if same and task in pending:  # untouched since it was read from here: never read it
            refresh.append({**record, **counts})
            continue
        if task in pending:
            data = link.store.read_task_bytes(task, record)
        else:
            data = task_bytes(mem.task_tensors(task), task, record)
        rel, digest = store.write_task(task, data)
        entry = {k: v for k, v in record.items() if k not in ("file", "sha256")}
        entry.update({"file": rel, "sha256": digest, **counts})
        put.append(entry)
    write_base = (None if base_entry["kind"] == "default"
                  else (lambda: save_base_once(mem, store.folder("base", "base.path"))))
    knowledge = compression.knowledge_entry_for_save(mem, same)
    if callable(knowledge):
        knowledge = knowledge(store)
    known_kb = link.knowledge_entry if same else None
    manifest = store.commit(base_entry, mem.conversion, put, refresh=refresh,
                            removed=set(known) - set(mem.registry.order), known=known, before_write=write_base,
                            version=__version__, knowledge=knowledge, known_knowledge=known_kb)
    for entry in put:
        mem.registry.stored_at(entry["name"], entry["file"], entry["sha256"])
    for task in list(pending):
        mem.registry.move_pending(task, store.entry_path(mem.records[task]))
    stored = {e["name"]: e.get("sha256") for e in manifest["tasks"]}
    link.on_disk = {t: stored[t] for t in mem.registry.order if t in stored}
    link.store = store
    link.knowledge_entry, link.knowledge_dirty = manifest.get("knowledge"), False
    return directory


def save_base_once(mem, base_dir: Path) -> None:
    """Store the custom base of ``mem`` in ``base_dir`` (float32), unless the same base is there already."""
    if (base_dir / "base.json").is_file():
        try:
            if base_config(base_dir).get("info", {}).get("state_sha256") == mem.base_hash:
                return  # saved once already
        except CheckpointError:
            pass
    G = Generator(**mem.generator.config())
    D = Discriminator(**mem.discriminator.config())
    G.load_state_dict(base_state(mem.generator))
    with mem.registry.discriminator_as("source"):
        D.load_state_dict(base_state(mem.discriminator))
    save_base(G, D, base_dir, dtype=torch.float32, info={"state_sha256": mem.base_hash})


def load_memory(cls, directory, *, lazy: bool = True):
    """:meth:`GANMemory.load`: a ``cls`` on the manifest's base (hash checked) with every task pending."""
    directory = Path(directory)
    store = Store(directory)
    manifest = store.read_manifest()
    base = manifest["base"]
    if base.get("kind") == "default":
        G, D = load_default_base()
        source = {"kind": "default", "file_sha256": base.get("file_sha256")}
    else:
        G, D = load_base(store.folder(base.get("path", "base"), "base.path"))
        source = {"kind": "custom"}
    conv = manifest.get("conversion", {})
    mem = cls(G, D, g_include=conv.get("generator", G_MODULATED), d_include=conv.get("discriminator", D_MODULATED),
              d_fc_per_task=conv.get("discriminator_fc_per_task", True), base_source=source)
    if mem.base_hash != base["sha256"]:
        raise CheckpointError(f"{directory / MANIFEST}: this memory was learned on a base with sha256 "
                              f"{base['sha256'][:12]}..., but the base found ({base.get('kind')}) has "
                              f"{mem.base_hash[:12]}...; its tasks would not fit")
    for entry in manifest["tasks"]:
        mem.registry.add_pending(entry["name"], dict(entry, metrics=dict(entry.get("metrics", {}))),
                                 store.entry_path(entry))
    mem.link = StoreLink(store=store, on_disk={e["name"]: e.get("sha256") for e in manifest["tasks"]},
                         knowledge_entry=manifest.get("knowledge"))
    if not lazy:
        for name in mem.tasks:
            try:
                mem.ensure_loaded(name)
            except TaskFileError as e:
                warnings.warn(str(e), stacklevel=3)  # the caller of GANMemory.load
    return mem


def verify_tasks(mem) -> dict[str, Optional[str]]:
    """:meth:`GANMemory.verify`: read every task not read yet; ``{task: None or the error message}``."""
    out = {}
    for name in mem.tasks:
        try:
            mem.ensure_loaded(name)
            out[name] = None
        except TaskFileError as e:
            out[name] = str(e)
    return out


def _old_manifest(store: Store) -> dict:
    """What can still be read of a damaged manifest (a JSON object), else ``{}``."""
    import json

    try:
        old = json.loads(store.inside(MANIFEST, "manifest").read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, CheckpointError):
        return {}
    return old if isinstance(old, dict) else {}


def rebuild_manifest(cls, directory) -> dict:
    """Rebuild a lost or damaged manifest from the task files (each names its task, and its file name its
    hash) and the knowledge-base files; returns ``{"tasks": [names], "skipped": {file or task: why}}``.

    The base is the one the damaged manifest names if it still can be read, else ``base/`` (a custom
    base) or the embedded one; each task file must fit it. A task with several files (older versions
    left for garbage collection) keeps the one the old manifest names, else the newest. Metrics (timings,
    scores) are not in the task files and are left empty.
    """
    store = Store(directory)
    if store.manifest_state() == "ok":
        raise CheckpointError(f"{store.directory / MANIFEST} is readable; nothing to rebuild")
    old = _old_manifest(store)
    base = old.get("base") if isinstance(old.get("base"), dict) else {}
    custom = base.get("kind") == "custom" or (not base and store.inside("base", "base.path").is_dir())
    if custom:
        G, D = load_base(store.folder(base.get("path", "base") if isinstance(base.get("path"), str) else "base",
                                      "base.path"))
        source = {"kind": "custom"}
    else:
        G, D = load_default_base()
        source = {"kind": "default", "file_sha256": None}
    conv = old.get("conversion") if isinstance(old.get("conversion"), dict) else {}
    mem = cls(G, D, g_include=conv.get("generator", G_MODULATED), d_include=conv.get("discriminator", D_MODULATED),
              d_fc_per_task=conv.get("discriminator_fc_per_task", True), base_source=source)
    if source["kind"] == "default":
        source["file_sha256"] = base.get("file_sha256")
    found, skipped = store.scan_task_files()
    named = {e.get("name"): e.get("file") for e in old.get("tasks", []) if isinstance(e, dict)} \
        if isinstance(old.get("tasks"), list) else {}
    chosen: dict[str, dict] = {}
    for f in sorted(found, key=lambda f: f["mtime"]):
        prev = chosen.get(f["name"])
        if prev is None or named.get(f["name"]) != prev["file"]:
            chosen[f["name"]] = f
    order = [n for n in named if n in chosen] + sorted((n for n in chosen if n not in named),
                                                       key=lambda n: chosen[n]["mtime"])
    entries = []
    for name in order:
        f = chosen[name]
        entry = {"name": name, "file": f["file"], "sha256": f["sha256"], **f["entry"], "metrics": {}}
        if "compression" not in entry:  # a naive task: it must fit this base
            problem = _fits(mem, name, store, entry, f["shapes"])
            if problem:
                skipped[name] = problem
                continue
        entry.setdefault("num_classes", None)
        entries.append(entry)
    compressed = {e["name"] for e in entries if "compression" in e}
    knowledge = None
    if compressed:
        def rows(k):
            return {r[0] for m in k["index"]["matrices"].values() for r in m["tasks"]}
        usable = [k for k in store.scan_knowledge_files() if rows(k) <= compressed]
        if usable:
            best = max(usable, key=lambda k: (len(rows(k)), k["mtime"]))
            knowledge = {"file": best["file"], "sha256": best["sha256"]}
            covered = rows(best)
        else:
            covered = set()
        for e in list(entries):
            if e["name"] in compressed and e["name"] not in covered:
                skipped[e["name"]] = "compressed task whose knowledge-base file is missing or damaged"
                entries.remove(e)
    from ..store import FORMAT

    manifest = {"format": FORMAT, "gmem_version": __version__, "base": _base_entry(mem),
                "conversion": mem.conversion, "tasks": entries}
    if knowledge:
        manifest["knowledge"] = knowledge
    store.replace_manifest(manifest)
    return {"tasks": [e["name"] for e in entries], "skipped": skipped}


def _fits(mem, name: str, store: Store, entry: dict, shapes: dict) -> Optional[str]:
    """None if task file ``entry`` installs on ``mem``'s base (``num_classes`` inferred from the head for
    files written before the entry was kept in them), else why not."""
    try:
        tensors = store.read_task(name, entry)
    except TaskFileError as e:
        return str(e)
    tries = [entry["num_classes"]] if "num_classes" in entry else [None]
    rows = (shapes.get("Dfc.weight") or [None])[0]
    if "num_classes" not in entry and isinstance(rows, int):
        tries.append(rows)
    for classes in tries:
        try:
            mem.registry.install(name, tensors, classes)
        except (ValueError, RuntimeError, KeyError):
            continue
        mem.registry.uninstall(name)
        entry["num_classes"] = classes
        return None
    return "does not fit this memory's base (a task of another base or conversion)"
