"""GAN memory: a frozen GP-GAN base plus one small style set per learned task (no forgetting).

    mem = GANMemory.default()                      # embedded 32x32 base, no tasks yet
    mem.learn("emoji", "emoji", iterations=2000)   # directory / .npz / Dataset / float tensor
    x = mem.sample("emoji", 16, seed=0)            # [16, 3, 32, 32] in [-1, 1]
    x = mem.sample(["emoji", "source"] * 8, seed=0)          # one forward, mixed tasks (replay)
    x = mem.interpolate("emoji", "icons", 0.5, 8, seed=0)    # style interpolation
    mem.save("my_memory");  mem = GANMemory.load("my_memory")

Conversion (the paper's released code, configurable through ``from_base``): the generator's ``fc`` and
every block's ``conv_0``/``conv_1`` are modulated (mFiLM / mAdaFM); the 1x1 shortcuts ``conv_s``,
``conv_img`` and the label embedding stay frozen and shared. In the discriminator the block convs are
modulated and ``fc`` is trained per task (a full copy of that small layer per task).

Training a task (:meth:`GANMemory.learn`) only touches that task's style parameters, so every earlier
task's samples stay bit for bit what they were. On disk (:meth:`save` / :meth:`load`) a memory is a
directory with ``manifest.json`` and one safetensors file per task (content-addressed names, each
written atomically, unchanged files never rewritten); tasks are read lazily on first use and a
missing or damaged file names itself in the error without affecting the other tasks.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import Tensor

from ..models import Discriminator, Generator, default_base_info, load_default_base
from ..store import TaskFileError, validate_task_name
from . import compression, persist
from .learning import learn_task
from .persist import StoreLink, state_hash
from .registry import D_MODULATED, G_MODULATED, TaskRegistry
from .sampling import TaskSampler

__all__ = ["GANMemory"]

CHECKPOINT = "checkpoint.pt"

TaskRef = Union[str, int]


# ------------------------------------------------------------------------------------- memory
class GANMemory:
    """A converted GP-GAN pair with a bank of tasks. See the module docstring for the workflow.

    The facade over its parts (``docs/design.md`` section 7): :attr:`registry`
    (:class:`gmem.memory.registry.TaskRegistry`: networks, tasks, per-task discriminator heads),
    :attr:`sampler` (:class:`gmem.memory.sampling.TaskSampler`), the trainer
    (:func:`gmem.memory.learning.learn_task` on :mod:`gmem.training`) and :attr:`link`
    (:class:`gmem.memory.persist.StoreLink`, what it knows about its store); persistence
    (:meth:`save`, :meth:`load`, :meth:`verify`) is :mod:`gmem.memory.persist` on a
    :class:`gmem.store.Store`.

    Attributes: ``generator`` / ``discriminator`` (the converted networks; :mod:`gmem.nn` functions
    apply to them), ``tasks`` (learned task names in order, without ``"source"``), ``base_hash``
    (SHA-256 of the base weights), ``records`` (per-task manifest entries: classes, training
    settings, metrics).
    """

    def __init__(self, G: Generator, D: Discriminator, *, g_include=G_MODULATED, d_include=D_MODULATED,
                 d_fc_per_task: bool = True, base_source: Optional[dict] = None):
        if not isinstance(G, Generator) or not isinstance(D, Discriminator):
            raise TypeError("GANMemory needs a gmem.models.Generator and Discriminator "
                            f"(got {type(G).__name__}, {type(D).__name__})")
        if G.size != D.size or G.channels != D.channels:
            raise ValueError(f"generator ({G.size}px, {G.channels} ch) and discriminator ({D.size}px, "
                             f"{D.channels} ch) do not match")
        G, D = copy.deepcopy(G).cpu().eval(), copy.deepcopy(D).cpu().eval()
        self.base_hash = state_hash(("G.", G.state_dict()), ("D.", D.state_dict()))
        self.base_source = dict(base_source or {"kind": "custom"})
        self.registry = TaskRegistry(G, D, g_include=g_include, d_include=d_include, d_fc_per_task=d_fc_per_task)
        self.sampler = TaskSampler(self.registry, self.ensure_loaded)
        self.link = StoreLink()  # the store it was loaded from / saved to (gmem.memory.persist owns it)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, G: Generator, D: Discriminator, **conversion) -> "GANMemory":
        """A memory on the base ``(G, D)`` (copied; the originals are left as they are), no tasks yet.

        ``conversion``: ``g_include`` / ``d_include`` (globs of layers to modulate; defaults
        :data:`G_MODULATED`, :data:`D_MODULATED`), ``d_fc_per_task`` (default True).
        """
        return cls(G, D, **conversion)

    @classmethod
    def default(cls, **conversion) -> "GANMemory":
        """The embedded pretrained 32x32 base (``gmem/assets/base``), no tasks yet."""
        G, D = load_default_base()
        info = default_base_info()
        return cls(G, D, base_source={"kind": "default", "file_sha256": info.get("sha256")}, **conversion)

    def to(self, device) -> "GANMemory":
        """Move the networks (and every per-task discriminator head) to ``device``."""
        self.registry.to(device)
        return self

    # ------------------------------------------------------------------ properties
    generator = property(lambda self: self.registry.G, doc="The converted generator (``gmem.nn`` functions apply).")
    discriminator = property(lambda self: self.registry.D, doc="The converted discriminator.")
    tasks = property(lambda self: list(self.registry.order),
                     doc="Learned task names, in the order they were learned (``'source'`` excluded).")
    size = property(lambda self: self.registry.G.size)
    channels = property(lambda self: self.registry.G.channels)
    z_dim = property(lambda self: self.registry.G.z_dim)
    device = property(lambda self: self.registry.device)
    conversion = property(lambda self: self.registry.conversion)
    g_converted = property(lambda self: self.registry.g_converted)
    d_converted = property(lambda self: self.registry.d_converted)
    records = property(lambda self: self.registry.records, doc="Manifest entries per task (the registry's dict).")

    def num_classes(self, task: str) -> Optional[int]:
        """Classes of a conditional task (None for an unconditional one or the source)."""
        return self.registry.num_classes(task)

    def __repr__(self) -> str:
        return (f"GANMemory(size={self.size}, nf={self.generator.nf}, tasks={self.tasks}, "
                f"base={self.base_source.get('kind')}:{self.base_hash[:12]})")

    # ------------------------------------------------------------------ task bookkeeping
    def _record(self, task: str) -> dict:
        return self.registry.record(task)

    def task_name(self, task: TaskRef) -> str:
        """A task name from a name or a position (0 = source, k = k-th learned task)."""
        return self.registry.name(task)

    def ensure_loaded(self, task: str) -> None:
        """Read a task's file if it is still pending (lazy loading; checked by the store, TaskFileError naming it)."""
        pending = self.registry.pending
        if task == "source" or task not in pending:
            return
        compression.load_dependencies(self, task)  # compressed: the tasks whose basis columns it uses
        tensors = self.link.store.read_task(task, self.records[task])
        try:
            self.registry.install(task, tensors, self.records[task].get("num_classes"))
            try:
                compression.check_installed(self, task)
            except BaseException:
                self.registry.remove(task, keep_record=True)
                raise
        except (KeyError, ValueError) as e:
            raise TaskFileError(f"task {task!r}: {pending[task]} does not fit this base: {e}") from None
        self.registry.loaded(task)

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        """Everything a task owns: ``G.<layer>.<group>``, ``D.<layer>.<group>``, ``Dfc.weight/bias``."""
        self.ensure_loaded(task)
        return self.registry.task_tensors(task)

    def remove(self, task: str) -> None:
        """Forget a task (its style sets and head); the other tasks are untouched.

        A compressed task whose basis columns later compressed tasks use cannot be removed
        (ValueError naming them); remove those first.
        """
        compression.before_remove(self, task)
        self.registry.remove(task)

    def compress(self, task: TaskRef, keep=None, layers=None) -> dict:
        """Store the naive ``task`` compressed in the knowledge bases (post-hoc, no training-time prior).

        Each selected conv's ``Gamma``/``B`` (``layers``: globs, default the generator blocks B0-B3 and the fc) is
        written on the current bases by least squares (``lam``) and the rest truncated by the rank rule
        (``keep``: None for the default :class:`gmem.compress.ResidualEnergyRule`, a fraction for the
        released energy rule, ``"width"`` for its width table, or any :class:`gmem.compress.RankRule`).
        Returns the task's ``compression`` record (``stored_values``, ``new_ranks``, ``max_rel_error``);
        :meth:`parameter_counts` then reports ``generator_stored``. Save to keep it.
        """
        return compression.compress_task(self, task, keep=keep, layers=layers)

    # ------------------------------------------------------------------ sampling (gmem.memory.sampling)
    def latents(self, n: int, seed: Optional[int] = None) -> Tensor:
        """``z [n, z_dim]``: standard normal; with ``seed`` always the same values for the same seed."""
        return self.sampler.latents(n, seed)

    def sample(self, task: Union[TaskRef, Sequence[TaskRef]], n: Optional[int] = None, z: Optional[Tensor] = None,
               seed: Optional[int] = None, labels=None, batch_size: int = 64) -> Tensor:
        """Images ``[n, C, H, W]`` in [-1, 1] from ``task`` (``"source"`` = the base).

        ``task`` may be a list with one task per sample: the whole batch then runs in one forward
        (mixed-task batch, e.g. generative replay). ``z [n, z_dim]`` or ``seed`` fix the latents
        (same seed, same images). ``labels``: class per sample for conditional tasks (default
        ``i % num_classes``); for the source, labels of a conditional base. Runs in chunks of
        ``batch_size``.
        """
        return self.sampler.sample(task, n, z=z, seed=seed, labels=labels, batch_size=batch_size)

    def sample_mixed(self, tasks: Sequence[TaskRef], z: Optional[Tensor] = None, seed: Optional[int] = None,
                     labels=None, batch_size: int = 64) -> Tensor:
        """One sample per entry of ``tasks`` (names or indices) in one forward: generative replay.

        Same as ``sample(list(tasks), ...)``; returns ``[len(tasks), C, H, W]``.
        """
        return self.sample(list(tasks), z=z, seed=seed, labels=labels, batch_size=batch_size)

    def interpolate(self, task_a: TaskRef, task_b: TaskRef, lam: Union[float, Sequence[float]], n: Optional[int] = None,
                    seed: Optional[int] = None, z: Optional[Tensor] = None, groups=("gamma", "beta", "bias"),
                    layers=None, labels=None, batch_size: int = 64) -> Tensor:
        """Samples of the style set ``(1 - lam) * task_a + lam * task_b`` for fixed latents.

        ``lam``: a number -> ``[n, C, H, W]``; a sequence -> ``[len(lam), n, C, H, W]`` (same z in each).
        ``groups``: which parameter groups mix (``"gamma"``/``"scale"``, ``"beta"``/``"shift"``,
        ``"bias"``); the rest stay at task_a (the paper's Figure 2). ``layers``: globs over generator
        layer names (e.g. ``"fc"``, ``"resnet_0_0.*"``) choosing which blocks mix (Figure 3);
        see :meth:`layer_names`.
        """
        return self.sampler.interpolate(task_a, task_b, lam, n, seed=seed, z=z, groups=groups, layers=layers,
                                        labels=labels, batch_size=batch_size)

    def layer_names(self) -> list[str]:
        """Names of the generator's modulated layers (for ``interpolate(layers=...)``)."""
        return self.registry.layer_names()

    def parameter_counts(self, task: Optional[str] = None) -> dict:
        """Parameter accounting: base sizes and what one task adds (style values vs the base).

        Returns ``generator_base``, ``discriminator_base`` (frozen weights), and for ``task`` (or an
        unconditional task if None) ``generator_style``, ``generator_style_ratio`` (the paper reports
        ~20% at 256px), ``discriminator_style``, ``discriminator_fc`` and ``total``, and
        ``generator_stored``: the generator values the task actually stores (its coefficients and new
        basis columns in compressed convs, everything else dense; equal to ``generator_style`` for a
        naive task).
        """
        if task is not None and compression.is_compressed(self, self.task_name(task)):
            self.ensure_loaded(self.task_name(task))
        return self.registry.parameter_counts(task)

    # ------------------------------------------------------------------ learning (gmem.memory.learning)
    def learn(self, name: str, data, iterations: int = 1000, batch_size: int = 16, seed: Optional[int] = None, *,
              labels=None, num_classes: Optional[int] = None, lr: float = 1e-4, betas=(0.0, 0.99),
              r1_gamma: float = 10.0, ema_decay: float = 0.999, ema_warmup: bool = True,
              out_dir=None, sample_every: Optional[int] = None, checkpoint_every: Optional[int] = None,
              max_seconds: Optional[float] = None, progress: bool = True, callback=None, restart: bool = False,
              plugins=(), compress=False, **step_options) -> int:
        """Learn task ``name`` from ``data``; returns its index (1 = first learned task, 0 = source).

        The index is the task's position in :attr:`tasks` plus one, which :meth:`sample` accepts; with
        :mod:`gmem.nn` functions on :attr:`generator` use the task's name (tasks of a loaded memory join
        the networks' banks in the order they are first used).

        ``data``: a directory of images, an .npy/.npz file, an embedded demo set name, a Dataset, or a
        float tensor ``[N, C, H, W]`` in [-1, 1] at the memory's resolution (folders and arrays are
        resized). Only this task's style parameters (generator and discriminator) and its
        discriminator head are trained, with the shared GP-GAN step (:mod:`gmem.training`):
        non-saturating loss, R1 ``r1_gamma * E||grad D(x)||^2`` on real data (the released code's
        convention: 10 is its default), Adam(``lr``, ``betas``), horizontal flips + dequantisation
        noise; by default the generator update first and the discriminator trained on the same fake
        batch, as the released GAN memory code does (``step_options`` may set any other
        :class:`gmem.training.StepConfig` field, e.g. ``order="d_first"``, ``r1_every``). The
        generator's style set kept for sampling is an EMA (``ema_decay``) of the trained one; with
        ``ema_warmup`` the decay is ``min(ema_decay, (1 + t) / (10 + t))`` at step t so short runs are
        not dominated by the initialisation. Everything random comes from ``seed`` (random if None;
        recorded). ``plugins``: :class:`gmem.training.Plugin` objects (extra loss terms, replay).

        Conditional task: ``labels=True`` uses the dataset's labels (class sub-folders, an .npz
        ``labels`` array), or pass a LongTensor ``[N]``; the generator's fc gets one bias per class
        and the discriminator head one output per class. ``num_classes`` defaults to ``max + 1``.

        ``out_dir``: progress files: ``samples/it_XXXXXXX.png`` grids (EMA generator, fixed z) every
        ``sample_every`` iterations, and ``checkpoint.pt`` every ``checkpoint_every`` (default: every
        ``max(50, iterations // 10)``) and at the end. A checkpoint there is resumed (the result
        equals an uninterrupted run) only if it has the same task, base, data (a hash of the images
        and labels) and settings; otherwise :class:`gmem.training.ResumeMismatch` names what differs,
        and ``restart=True`` discards it and starts over. ``max_seconds`` stops early (the task keeps
        what it learned). ``callback(iteration, losses)`` is called after each step. If learning
        fails or is interrupted, the task is removed from the memory again.

        ``compress``: learn with the paper's low-rank prior and knowledge base (``True`` for the
        defaults, or a dict / :class:`gmem.compress.knowledge.CompressionSettings`: ``layers`` (globs,
        default the generator blocks B0-B3 and the fc), ``keep`` (kept energy, default by layer width),
        ``prior_weight`` 0.01, ``prior_every`` 10, ``weighted``). The selected convs train as
        ``L diag(lam) R^T + E`` with the nuclear-norm prior on ``E`` and are stored as coefficients plus
        new basis columns (see :mod:`gmem.compress.knowledge`).
        """
        validate_task_name(name)
        compress = compression.prepare_learning(self, compress)
        return learn_task(self, name, data, iterations=iterations, batch_size=batch_size, seed=seed, labels=labels,
                          num_classes=num_classes, lr=lr, betas=betas, r1_gamma=r1_gamma, ema_decay=ema_decay,
                          ema_warmup=ema_warmup, out_dir=out_dir, sample_every=sample_every,
                          checkpoint_every=checkpoint_every, max_seconds=max_seconds, progress=progress,
                          callback=callback, restart=restart, plugins=plugins, compress=compress, **step_options)

    # ------------------------------------------------------------------ persistence
    def set_metric(self, task: str, key: str, value) -> None:
        """Record a metric (JSON-serialisable) for ``task``; saved in the manifest."""
        self._record(task)["metrics"][key] = value

    def save(self, directory) -> Path:
        """Write the memory to ``directory``: ``manifest.json`` + ``tasks/<stem>-<sha16>.safetensors``.

        The rules are :mod:`gmem.store`'s: task files are content addressed (deterministic bytes; a
        file already there is never rewritten), written atomically under unique temporary names, and
        the manifest is merged under the directory's lock with what other processes saved meanwhile:
        this save adds or updates this memory's tasks and removes only the tasks removed from this
        memory since it was loaded from (or saved to) ``directory``. A task another process stored
        under the same name with other contents raises :class:`gmem.store.TaskConflictError` and
        nothing is saved. A task of ``directory`` that was never used is not read (a damaged file
        stays as it is and the other tasks are saved); saving it to another directory copies its
        checked file. A memory on a custom base also stores the base once in ``base/``.
        """
        return persist.save_memory(self, directory)

    @classmethod
    def load(cls, directory, *, lazy: bool = True) -> "GANMemory":
        """Open a memory written by :meth:`save`.

        The manifest is validated (errors name the field), the base description is checked within
        bounds before the base is built, and the base is checked against the manifest's hash. Task
        files are read when a task is first used (``lazy``), each confined to the memory directory
        and checked against its SHA-256; a missing or damaged file (or an entry without a hash)
        raises :class:`TaskFileError` naming it, for that task only. ``lazy=False`` reads every task
        now and warns (naming the file) about those that cannot be read, which stay unusable.
        """
        return persist.load_memory(cls, directory, lazy=lazy)

    @classmethod
    def rebuild_manifest(cls, directory) -> dict:
        """Rebuild the lost or damaged manifest of ``directory`` from its task and knowledge-base files
        (:func:`gmem.memory.persist.rebuild_manifest`); ``{"tasks": [...], "skipped": {what: why}}``."""
        return persist.rebuild_manifest(cls, directory)

    def verify(self) -> dict[str, Optional[str]]:
        """Read every task not read yet; ``{task: None or the error message}``."""
        return persist.verify_tasks(self)

    @property
    def loaded_tasks(self) -> list[str]:
        """Tasks whose weights are in memory (the others are read on first use)."""
        return [t for t in self.registry.order if t not in self.registry.pending]

