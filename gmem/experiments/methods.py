"""The one registry of lifelong methods the experiments compare: GAN memory and the baselines.

Each :class:`Method` names a :class:`gmem.training.learner.Learner` factory (``make(G, D, num_labels,
**options)``; None for a method without a generator) and how the classification experiment trains its
classifier with it (:attr:`Method.classifier`: ``"replay"`` from the learner, ``"ewc"``, ``"current"``
task only, ``"joint"`` data). The generation experiment runs the methods that have a generator.

Add a method by writing a class that implements the :class:`~gmem.training.learner.Learner` protocol
and registering it here with :func:`register` (no experiment code changes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..baselines import FineTune, Joint, MeRGAN
from ..memory.learner import MemoryLearner
from ..training.learner import Learner

__all__ = ["Method", "METHODS", "register", "get_method", "make_learner", "GENERATION_METHODS",
           "CLASSIFICATION_METHODS", "LR_MEMORY", "LR_BASELINES"]

CLASSIFIER_MODES = ("replay", "ewc", "current", "joint")


@dataclass(frozen=True)
class Method:
    """A lifelong method: ``make(G, D, num_labels, **options) -> Learner`` (None: no generator) and the
    classification experiment's use of it (``classifier``: one of ``replay``, ``ewc``, ``current``,
    ``joint``; None: not a classification method)."""

    name: str
    make: Optional[Callable[..., Learner]]
    classifier: Optional[str] = None
    description: str = ""
    #: the generator the classification experiment replays from, when it is not ``make``'s
    make_for_classes: Optional[Callable[..., Learner]] = None

    def learner_for_classes(self, G, D, num_labels: int, **options) -> Optional[Learner]:
        """The learner the classification experiment replays from (None unless ``classifier == "replay"``)."""
        if self.classifier != "replay":
            return None
        return (self.make_for_classes or self.make)(G, D, num_labels, **options)

    def __post_init__(self):
        if self.classifier is not None and self.classifier not in CLASSIFIER_MODES:
            raise ValueError(f"method {self.name!r}: classifier must be one of {CLASSIFIER_MODES}, "
                             f"got {self.classifier!r}")
        if self.classifier == "replay" and self.make is None:
            raise ValueError(f"method {self.name!r}: replay needs a generator (make)")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (ValueError if the name is taken)."""
    if method.name in METHODS:
        raise ValueError(f"a method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown baseline {name!r}: no such lifelong method; choose from {list(METHODS)}")
    return METHODS[name]


def make_learner(name: str, G, D, num_labels: int, **options) -> Learner:
    """The learner of method ``name`` on the base ``(G, D)`` with ``num_labels`` conditions."""
    method = get_method(name)
    if method.make is None:
        raise KeyError(f"method {name!r} has no generator; methods with one: "
                       f"{[m for m, v in METHODS.items() if v.make is not None]}")
    return method.make(G, D, num_labels, **options)


#: each method's learning rate in the generation experiment: the best of ``gmem.experiments.lr_sweep`` on
#: emoji (200 iterations of batch 16, standard FID of 256 samples, 2 seeds; experiments/results/lr_sweep):
#: GAN memory's style parameters 1e-4 (3e-5 ties it, 3e-4 and 1e-3 are worse), the whole-network
#: baselines 3e-5 (fine-tuning's best of 1e-5 to 3e-4)
LR_MEMORY = 1e-4
LR_BASELINES = 3e-5

# The factories take the experiments' common options: ``tasks`` (names of the task-incremental
# conditions), ``lr`` (the baselines' learning rate), ``lr_memory`` (GAN memory's), ``lambda_ra``
# (MeRGAN's); each uses those that apply to it.
def _memory(G, D, num_labels, *, tasks=None, lr=None, lr_memory=LR_MEMORY, lambda_ra=None, **options):
    return MemoryLearner(G, D, tasks=tasks, lr=lr_memory, **options)  # one task (or class group) per condition


def _baseline(cls, **fixed):
    def make(G, D, num_labels, *, tasks=None, lr_memory=None, lambda_ra=1e-3, **options):
        if cls is MeRGAN:
            options["lambda_ra"] = lambda_ra
        return cls(G, D, num_labels, **fixed, **options)

    return make


register(Method("gan_memory", _memory, "replay", "GAN memory: one style set per task, replay from it"))
register(Method("mergan_ra", _baseline(MeRGAN, mode="ra"), None, "MeRGAN with replay alignment"))
register(Method("mergan_replay", _baseline(MeRGAN, mode="replay"), "replay",
                "MeRGAN replay; in classification, replay from a MeRGAN (replay alignment) generator",
                make_for_classes=_baseline(MeRGAN, mode="ra")))
register(Method("ewc", None, "ewc", "elastic weight consolidation of the classifier, no replay"))
register(Method("finetune", _baseline(FineTune), "current", "sequential fine-tuning"))
register(Method("joint", _baseline(Joint), "joint", "all the real data so far (an upper bound)"))

#: the methods each experiment runs by default, in the order of its tables
GENERATION_METHODS = ("gan_memory", "mergan_ra", "mergan_replay", "finetune", "joint")
CLASSIFICATION_METHODS = ("gan_memory", "mergan_replay", "ewc", "finetune", "joint")
