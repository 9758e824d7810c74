"""Compressed tasks of a :class:`gmem.GANMemory`: loading order, the knowledge-base file, post-hoc compression.

A memory's knowledge bases (:class:`gmem.compress.knowledge.Knowledge`, on its registry) are complete
only when every compressed task is loaded: a compressed task's expression uses the columns of every
task stored before it in a base. So loading a compressed task first loads those (in the order of the
knowledge-base file), and every change of the bases (learning or compressing a task, removing one)
first loads all compressed tasks. The knowledge-base file (``knowledge/knowledge-<sha16>.json``, see
:mod:`gmem.store`) records the bases' order and column ranges; each task's coefficients and new
columns are in its own task file (``G.<layer>.lowrank.<gamma|beta>.<lam|u|s|v>``).
"""
from __future__ import annotations

import logging
from typing import Optional

from ..compress.energy import rank_rule
from ..compress.knowledge import DEFAULT_LAYERS, CompressionSettings, compress_dense_task, index_order
from ..store.files import knowledge_bytes

__all__ = ["is_compressed", "knowledge_index", "load_dependencies", "load_all_compressed", "check_installed",
           "before_remove", "prepare_learning", "knowledge_entry_for_save", "compress_task", "compression_record"]

logger = logging.getLogger(__name__)


def is_compressed(mem, task: str) -> bool:
    """Whether ``task`` is stored compressed (from its record; works before the task is read)."""
    return task != "source" and "compression" in mem.records.get(task, {})


def knowledge_index(mem) -> Optional[dict]:
    """The knowledge-base file's index of the directory ``mem`` was loaded from (checked, cached), or None."""
    link = mem.link
    entry = link.knowledge_entry
    if entry is None or link.store is None:
        return None
    cached = link.knowledge_cache
    if cached is None or cached[0] != entry.get("sha256"):
        cached = (entry.get("sha256"), link.store.read_knowledge(entry))
        link.knowledge_cache = cached
    return cached[1]


def load_dependencies(mem, task: str) -> None:
    """Load the tasks stored before ``task`` in any knowledge base (their columns are ``task``'s too)."""
    if not is_compressed(mem, task):
        return
    for dep in index_order(knowledge_index(mem), task):
        if dep in mem.registry.pending:
            mem.ensure_loaded(dep)


def check_installed(mem, task: str) -> None:
    """ValueError if an installed compressed task's columns disagree with the knowledge-base file."""
    index = knowledge_index(mem) if task in mem.registry.knowledge else None
    if index is None:
        return
    bases = mem.registry.knowledge.bases
    for key, mat in index["matrices"].items():
        for name, start, rank in mat["tasks"]:
            if name != task:
                continue
            kb = bases.get(key)
            if kb is None or task not in kb:
                raise ValueError(f"the knowledge-base file lists it in {key}, its file has no such entry")
            t = kb.entry(task)
            if (t.start, t.end - t.start) != (start, rank):
                raise ValueError(f"{key}: its columns {t.start}+{t.end - t.start} disagree with the knowledge-base "
                                 f"file ({start}+{rank})")


def load_all_compressed(mem) -> None:
    """Read every compressed task not read yet (before the knowledge bases change)."""
    for task in list(mem.registry.order):
        if task in mem.registry.pending and is_compressed(mem, task):
            mem.ensure_loaded(task)


def before_remove(mem, task: str) -> None:
    """Before :meth:`GANMemory.remove` drops a compressed ``task``: load every compressed task (the bases
    must be complete to see who uses its columns) and mark the knowledge-base file for rewriting."""
    if is_compressed(mem, task):
        load_all_compressed(mem)
        mem.link.knowledge_dirty = True


def prepare_learning(mem, compress):
    """The :class:`CompressionSettings` of :meth:`GANMemory.learn`'s ``compress`` argument (None: learn
    naive); learning compressed first loads every compressed task (the bases are about to grow)."""
    settings = CompressionSettings.coerce(compress)
    if settings is not None:
        load_all_compressed(mem)
    return settings


def knowledge_entry_for_save(mem, same_directory: bool):
    """What :meth:`GANMemory.save` passes as ``knowledge`` to :meth:`gmem.store.Store.commit`: ``()`` to keep
    the store's file, else a callable writing the current index to a store (None if nothing is compressed)."""
    compressed = any(is_compressed(mem, t) for t in mem.registry.order)
    if same_directory and not mem.link.knowledge_dirty:
        return ()
    if not compressed:
        return lambda store: None
    load_all_compressed(mem)

    def write(store):
        rel, digest = store.write_knowledge(knowledge_bytes(mem.registry.knowledge.index()))
        return {"file": rel, "sha256": digest}

    return write


def compression_record(mem, task: str, settings: dict, info: dict) -> dict:
    """The ``compression`` entry of a task's record (manifest): settings, stored values and ranks."""
    k = mem.registry.knowledge
    dense = sorted({key.rsplit(".", 1)[0] for key, i in info.items() if i.get("dense")})
    capped = sorted(key for key, i in info.items() if i.get("capped") and not i.get("dense"))
    if dense:
        logger.warning("task %r: layers %s stay dense (their low-rank factors would cost more than the dense "
                       "matrices)", task, ", ".join(dense))
    if capped:
        logger.info("task %r: the rank rule's budget cut the new columns of %s", task, ", ".join(capped))
    return {**settings, "stored_values": k.stored_values(task), "dense_values": k.dense_values(task),
            "new_ranks": {key: i["new_rank"] for key, i in info.items() if not i.get("dense")},
            "dense_layers": dense,  # selected, but stored dense: their factors would cost more than naive
            "capped": capped,  # matrices whose new columns the rule's budget cut below its energy target
            "max_rel_error": max((round(i["rel_error"], 6) for i in info.values()), default=0.0)}


def compress_task(mem, task: str, keep: Optional[float] = None, layers=None) -> dict:
    """:meth:`GANMemory.compress`: store the naive ``task`` compressed; returns its ``compression`` record.

    ``layers``: globs of the generator convs to compress (None: :data:`DEFAULT_LAYERS`, blocks B0-B3 and the fc).
    """
    layers = DEFAULT_LAYERS if layers is None else layers
    name = mem.task_name(task)
    if name == "source":
        raise ValueError("compress: the source is the frozen base; name a learned task")
    if is_compressed(mem, name):
        raise ValueError(f"compress: task {name!r} is compressed already")
    load_all_compressed(mem)
    mem.ensure_loaded(name)
    info = compress_dense_task(mem.generator, name, mem.registry.knowledge, layers=layers, keep=keep)
    layers = CompressionSettings(layers=layers).to_dict()["layers"]  # checked; JSON (shapes as lists)
    keep = rank_rule(keep).describe()  # the record is JSON: a fraction, or the rule's description
    record = compression_record(mem, name, {"mode": "post-hoc", "layers": layers, "keep": keep}, info)
    mem.records[name]["compression"] = record
    mem.link.knowledge_dirty = True
    return record
