"""Mutation check: break the code on purpose, one way at a time, and make sure a test notices.

Each mutation is a text substitution in one source file: the ops' reference formulas (signs, missing
terms, wrong reductions, transposes), the mixed-task grouping (permutation, inverse, segment offsets)
and the memory store (hash checks, atomic writes). For each, the script edits a *copy* of the
repository (the working tree is never touched), runs the tests that cover that code with ``-x`` and a
time limit, and reports the mutations no test caught ("survivors"). A mutation whose pattern is not
found (code moved or rewritten) is reported as skipped, so the list can be brought up to date.

    .venv/bin/python tools/mutate.py               # every mutation (tens of minutes on 2 cores)
    .venv/bin/python tools/mutate.py --list        # what would run
    .venv/bin/python tools/mutate.py --only store  # the mutations whose name contains "store"

Exit status: 0 when every applicable mutation was killed, 1 when any survived (or the unmutated
baseline fails its tests).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the float64-formula tests first (they kill most mutations in seconds); the slow gradcheck and
# low-rank training tests add nothing these do not check
_SLOW = "not test_gradcheck_single_and_mixed and not test_lowrank_matches_dense_and_trains_factors"
OPS_TESTS = ["tests/test_ops.py", "tests/test_op_paths.py", "-k", _SLOW]
LOWRANK_TESTS = ["tests/test_op_paths.py", "tests/test_ops.py", "-k", _SLOW]
STORE_FILES = ["gmem/store/files.py", "gmem/atomic.py", "gmem/store/gc.py", "gmem/store/directory.py",
               "gmem/memory/persist.py"]  # the store's modules (the first containing the pattern is mutated)
STORE_TESTS = ["tests/test_mutations.py", "tests/test_store_gc.py", "tests/test_memory.py", "tests/test_store.py",
               "-k", "save or load or damaged or crash or rewrites or other_base or replaces or garbage or grace "
                     "or collect or content or atomic or tmp or gc or young or stale or run_folder"]


@dataclass
class Mutation:
    name: str
    files: list  # candidate files, relative to the repository root; the first containing `old` is mutated
    old: str
    new: str
    tests: list  # pytest arguments


def _ref(name, old, new):
    return Mutation(f"reference: {name}", ["gmem/ops/reference.py"], old, new, OPS_TESTS)


MUTATIONS = [
    # -- reference formulas ---------------------------------------------------------------------
    _ref("madafm gamma and beta swapped", "torch.addcmul(beta[..., None, None], gamma[..., None, None], weight_norm)",
         "torch.addcmul(gamma[..., None, None], beta[..., None, None], weight_norm)"),
    _ref("madafm kernel window transposed", "gamma[..., None, None], weight_norm)",
         "gamma[..., None, None], weight_norm.transpose(-1, -2))"),
    _ref("dbeta a mean instead of a sum", "grad_weight.sum((-2, -1))", "grad_weight.mean((-2, -1))"),
    _ref("dgamma without weight_norm", "(grad_weight * weight_norm).sum((-2, -1))", "grad_weight.sum((-2, -1))"),
    _ref("normalize: biased std", "std = flat.std(-1)", "std = flat.std(-1, unbiased=False)"),
    _ref("normalize: mean added", "norm = (flat - mean[..., None])", "norm = (flat + mean[..., None])"),
    _ref("conv: bias of task 0 for every task", "task_bias = None if bias is None else bias[task]",
         "task_bias = None if bias is None else bias[0]"),
    _ref("conv dx with the unmodulated weight", "conv2d_input(x.shape, weight, grad_out",
         "conv2d_input(x.shape, weight_norm, grad_out"),
    _ref("conv dbias sign", "dbias = grad_out.sum((0, 2, 3))", "dbias = -grad_out.sum((0, 2, 3))"),
    _ref("conv mixed: dgamma and dbeta rows swapped",
         "dgamma_rows[task], dbeta_rows[task], dbias_rows[task] = dg, db, dc",
         "dgamma_rows[task], dbeta_rows[task], dbias_rows[task] = db, dg, dc"),
    _ref("conv mixed: absent tasks get ones", "zero = like.new_zeros(like.shape[1:])",
         "zero = like.new_ones(like.shape[1:])"),
    _ref("linear: beta term without the row sum", "torch.addcmul(beta * row_sum, gamma, shared)",
         "torch.addcmul(beta, gamma, shared)"),
    _ref("linear: row mean instead of row sum", "row_sum = x.sum(-1, keepdim=True)",
         "row_sum = x.mean(-1, keepdim=True)"),
    _ref("linear dx without the beta term",
         "dx = (grad_out * g) @ weight_norm + (grad_out * b).sum(-1, keepdim=True)",
         "dx = (grad_out * g) @ weight_norm"),
    _ref("linear dx with the transposed weight", "dx = (grad_out * g) @ weight_norm +",
         "dx = (grad_out * g) @ weight_norm.flip(0) +"),
    _ref("linear dbeta sign", "per_task(grad_out * x.sum(-1, keepdim=True), beta)",
         "per_task(-grad_out * x.sum(-1, keepdim=True), beta)"),
    _ref("linear mixed: bias of the wrong task", "bias = None if bias is None else bias.index_select(0, task_ids)",
         "bias = None if bias is None else bias.index_select(0, task_ids.flip(0))"),
    _ref("linear mixed: per-task sums to the wrong task", "index_add(0, task_ids, values)",
         "index_add(0, task_ids.flip(0), values)"),
    _ref("linear mixed: per-task sums over the whole batch", "if task_ids is None:\n            return values.sum(0)",
         "if True:\n            return values.sum(0).expand(like.shape)"),
    # -- mixed-task grouping ----------------------------------------------------------------------
    _ref("grouping: descending sort", "torch.argsort(task_ids, stable=True)",
         "torch.argsort(task_ids, stable=True, descending=True)"),
    _ref("grouping: outputs written back by order, not its inverse",
         "return torch.cat(outputs).index_select(0, _inverse_permutation(order))",
         "return torch.cat(outputs).index_select(0, order)"),
    _ref("grouping: dx written back by order, not its inverse",
         "dx = torch.cat(dx_parts).index_select(0, _inverse_permutation(order))",
         "dx = torch.cat(dx_parts).index_select(0, order)"),
    _ref("grouping: inverse permutation is the identity",
         "inverse[order] = torch.arange(order.numel(), device=order.device)",
         "inverse[:] = torch.arange(order.numel(), device=order.device)"),
    _ref("grouping: segment offsets one off",
         "segments.append((task, start, start + count))\n            start += count",
         "segments.append((task, max(start - 1, 0), start + count - 1))\n            start += count"),
    _ref("grouping: segments by position, not task", "segments.append((task, start, start + count))",
         "segments.append((len(segments), start, start + count))"),
    # -- low-rank styles --------------------------------------------------------------------------
    Mutation("lowrank: dense doubled", ["gmem/ops/lowrank.py"],
             "return (self.u * self.s.unsqueeze(-2)) @ self.v.transpose(-1, -2)",
             "return 2 * (self.u * self.s.unsqueeze(-2)) @ self.v.transpose(-1, -2)", LOWRANK_TESTS),
    Mutation("lowrank: s squared", ["gmem/ops/lowrank.py"], "(self.u * self.s.unsqueeze(-2))",
             "(self.u * self.s.square().unsqueeze(-2))", LOWRANK_TESTS),
    # -- the store ----------------------------------------------------------------------------------
    Mutation("store: a read skips the hash check", STORE_FILES, "if digest != expected:", "if False:",
             STORE_TESTS),
    Mutation("store: a read compares a truncated hash", STORE_FILES, "if digest != expected:",
             "if digest[:2] != expected[:2]:", STORE_TESTS),
    Mutation("store: save reuses a task file without checking its hash", STORE_FILES,
             "    if path.is_file() and sha256_file(path) == digest:\n", "    if path.is_file():\n", STORE_TESTS),
    Mutation("store: atomic write straight into the target", STORE_FILES,
             "    tmp = temporary_name(path)\n", "    tmp = path\n", STORE_TESTS),
    Mutation("store: a failed atomic write leaves its temporary file", STORE_FILES,
             "        with contextlib.suppress(FileNotFoundError):\n            tmp.unlink()",
             "        pass", STORE_TESTS),
    Mutation("store: task file name ignores the content hash", STORE_FILES,
             'return f"{TASKS_DIR}/{_stem(name)}-{digest[:16]}.safetensors"',
             'return f"{TASKS_DIR}/{_stem(name)}.safetensors"', STORE_TESTS),
    Mutation("store: garbage collection ignores the grace period", STORE_FILES,
             "or now - path.stat().st_mtime < grace:", "or False:", STORE_TESTS),
    Mutation("store: garbage collection deletes referenced files", STORE_FILES,
             "if path.resolve() in referenced or not path.is_file()", "if not path.is_file()", STORE_TESTS),
]


def _copy_tree(dest: Path) -> None:
    """The files git knows (tracked or not ignored) plus the built extension, into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    extra = [str(p.relative_to(ROOT)) for p in (ROOT / "gmem").glob("*.so")]
    for rel in filter(None, listed + extra):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _pytest(copy: Path, args: list, timeout: float) -> tuple[str, float, str]:
    """("passed" | "failed" | "timeout", seconds, the last lines of output)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{' '.join(m.tests)}]")
        return 0
    results = {"killed": [], "survived": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="gmem-mutate-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        if not args.no_baseline:
            for tests in {tuple(m.tests) for m in chosen}:
                status, seconds, tail = _pytest(copy, list(tests), args.timeout)
                print(f"baseline {' '.join(tests)}: {status} ({seconds:.0f} s)", flush=True)
                if status != "passed":
                    print(tail)
                    return 1
        for m in chosen:
            target = next((f for f in m.files if (copy / f).is_file() and m.old in (copy / f).read_text()), None)
            if target is None:
                results["skipped"].append(m.name)
                print(f"SKIPPED   {m.name}: pattern not found in {m.files}", flush=True)
                continue
            path = copy / target
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                status, seconds, tail = _pytest(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if status == "passed" else "killed"
            results["survived" if status == "passed" else "killed"].append(m.name)
            note = " (time limit)" if status == "timeout" else ""
            print(f"{verdict:9s} {m.name} [{target}] ({seconds:.0f} s){note}", flush=True)
    tried = len(results["killed"]) + len(results["survived"])
    print(f"\nmutations tried {tried}, killed {len(results['killed'])}, survived {len(results['survived'])}, "
          f"skipped {len(results['skipped'])}")
    for name in results["survived"]:
        print(f"  survivor: {name}")
    return 1 if results["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
