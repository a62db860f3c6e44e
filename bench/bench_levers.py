"""Small-budget training levers on the embedded target, at equal wall or CPU time (issues: the demo, 15, 16).

    python bench/bench_levers.py --labels DEMO_OUT/labels --minutes 6 --variants base,layers5,slots4x128,ce

Each variant trains the demo's stage-1 recipe (kd from scratch unless the variant says otherwise)
with its schedule sized to the same time budget (`train.time_budget_s`), two variants at a time
with one thread each, then reports the held-out simulated tau of its final checkpoint (SPEC
section 4: walk the target's own continuation, accept while the draft's greedy block matches; for
a DFlash2 draft the walk of its selector, as the trainer logs it), the steps it reached and its
slot-1 training accuracy over the last 10 steps.

Options for measuring a lever against noise and from a warm start (issues 15 and 16):

    # issue 15: the base loss, from one v1 stage-1 warm start, two seeds, a shared feature cache
    python bench/bench_levers.py --labels L --minutes 2.5 --budget cpu --seeds 0,1 --heldout 24 \
        --feature-cache W/cache --prefill --warm-start-minutes 6 --work W/losses \
        --variants survival-eal,dpace-anchors,dpace-weights,ce
    # issue 16: v1 vs DFlash2 from the same warm start, with real tau on the demo's eval prompts
    python bench/bench_levers.py --labels L --minutes 2.5 --budget cpu --seeds 0,1 --heldout 24 \
        --feature-cache W/cache --init W/losses/warm-start/checkpoints/final --work W/dflash2 \
        --variants v1,dflash2,dflash2-exclude --real-tau --bench-dir BENCH_DIR
    # both in one run: `v1` IS `survival-eal` from a warm start (the stage-2 recipe's loss)
    ... --variants survival-eal,dpace-anchors,dpace-weights,ce,dflash2,dflash2-exclude \
        --real-tau survival-eal,dflash2,dflash2-exclude --bench-dir BENCH_DIR

- `--seeds 0,1` repeats every variant with `train.seed` = each seed. The seed also draws the
  held-out split, so the spread between seeds is the noise of one run (training and held-out set
  together); differences between variants are read per seed (paired: the same held-out split).
- `--init CKPT` starts every variant from that checkpoint with the demo's stage-2 recipe
  (survival-eal, lr 1e-3; a DFlash2 variant warm-starts its backbone from a v1 CKPT, conv at identity,
  successor codebook at zero). `--warm-start-minutes M` trains that checkpoint first: the demo's stage 1
  for M minutes on the labels minus every sequence that any of `--seeds` holds out, so no variant's
  held-out sequences were seen by its starting point.
- `--feature-cache DIR` shares one cache of target features between the runs (the same for v1 and
  DFlash2: both read layer 15); `--prefill` fills it for every labelled sequence first, so no run
  spends its budget on target forwards.
- `--budget cpu`: the trainer's time budget times three steps once, so on a shared machine a run
  whose timed steps fell in a quiet moment trains far longer (BENCHMARKS.md section 8: 2x). With
  `cpu` a calibration measures each variant's CPU seconds per step (`--calibration-steps`, two
  variants side by side) and fixes its schedule (`train.max_steps`) to `--minutes` of CPU time; the
  table reports the training CPU seconds each run really spent (from /proc), which is the figure to
  check (with 5 calibration steps the v1 runs spent 1.4-1.6x their calibrated time, DFlash2 1.0x).
- `--real-tau [VARIANTS]` evaluates the final checkpoints (of all variants, or of those listed) with
  the builtin harness (`dflash-lab eval`) on the demo's eval prompts: the paper's selection, 2 prompts
  per benchmark, 64 new tokens, lossless check on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "base": [],  # the demo recipe as it is now
    "all-slots": ["loss.max_slot=null"],  # the head over all 15 slots
    "s4-it28": ["loss.max_slot=4", "draft.init_from_target_layers=true", "draft.target_layer_ids=[28]"],
    "layers5": ["draft.target_layer_ids=[1,8,15,22,29]"],
    "slots4x128": ["loss.max_slot=4", "data.num_anchors=128"],
    "ce": ["loss.name=ce"],
    "lr5e-3": ["train.lr=5e-3"],
    "init-target": ["draft.init_from_target_layers=true"],
    "lr6e-4": ["train.lr=6e-4"],
    "anchors128": ["data.num_anchors=128"],
    # the head over 4 slots instead of 15: about 3x the steps in the same time
    "s4": ["loss.max_slot=4"],
    "s4-lr5e-3": ["loss.max_slot=4", "train.lr=5e-3"],
    "s4-init-target": ["loss.max_slot=4", "draft.init_from_target_layers=true"],
    "s4-ce": ["loss.max_slot=4", "loss.name=ce"],
    "s4-a96": ["loss.max_slot=4", "data.num_anchors=96"],
    "s4-lr1e-2": ["loss.max_slot=4", "train.lr=1e-2"],
    "s4-it-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3"],
    # the feature that feeds the copied last layer (layer 28's output): its K/V start as the target's
    "s4-it28-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                       "draft.target_layer_ids=[28]"],
    "s4-it28x3-lr5e-3": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                         "draft.target_layer_ids=[8,18,28]"],
    "s4-it-lr5e-3-mb1": ["loss.max_slot=4", "draft.init_from_target_layers=true", "train.lr=5e-3",
                         "train.micro_batch=1", "train.global_batch=1"],
    "s4-lr5e-3-mb1": ["loss.max_slot=4", "train.lr=5e-3", "train.micro_batch=1", "train.global_batch=1"],
    # issue 15: the base loss (pure D-PACE: kl_weight stays at its default 0)
    "survival-eal": ["loss.name=survival-eal"],
    "dpace-anchors": ["loss.name=dpace", "loss.dpace_alpha=0.5", "loss.normalize=anchors"],
    "dpace-weights": ["loss.name=dpace", "loss.dpace_alpha=0.5", "loss.normalize=weights"],
    # issue 16: the demo's v1 draft (block 16) against its DFlash2 draft (block 8, gamma 4, selector CE)
    "v1": [],
    "dflash2": ["@dflash2", "loss.selector_gold=replace"],
    "dflash2-exclude": ["@dflash2", "loss.selector_gold=exclude"],
}
STAGE_NAMES = {"1": "stage1-kd", "2": "stage2-survival-eal"}


def arch_overrides(arch: str) -> list[str]:
    """The draft and loss keys in which the demo's `arch` recipe differs from its v1 recipe, as
    overrides (so a DFlash2 variant is exactly `dflash-lab demo --arch dflash2`'s draft and loss)."""
    from dflash_lab.demo import PRESETS, demo_recipe

    v1 = demo_recipe(PRESETS["default"], "stage1-kd", Path("."))
    other = demo_recipe(PRESETS["default"], "stage1-kd", Path("."), arch=arch)
    return [f"{section}.{key}={json.dumps(value)}" for section in ("draft", "loss")
            for key, value in other[section].items() if v1[section].get(key, object()) != value]


def expand(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        out.extend(arch_overrides(item[1:]) if item.startswith("@") else [item])
    return out


def recipe(cache: str, minutes: float, stage: str = "stage1-kd", init: str = "scratch", heldout: int = 16,
           threads: int = 1, wall_budget: bool = True) -> dict:
    """The demo's `stage` recipe for one run: `minutes` of training sized by the trainer's time
    budget (`wall_budget`), or the schedule left to a `train.max_steps` override (`--budget cpu`)."""
    from dflash_lab.demo import PRESETS, demo_recipe

    r = demo_recipe(PRESETS["default"], stage, Path(cache), init=init)
    # the schedule is sized to the time budget; one held-out evaluation, at the end
    r["train"].update(max_steps=100000, time_budget_s=minutes * 60 if wall_budget else None, min_steps=None, eval_interval=0,
                      save_every=0, cpu_threads=threads, keep_last=1)
    # a count (not the demo's 5%): more held-out blocks, less noise in the tau of one run
    r["data"].update(heldout=heldout, heldout_max=heldout)
    return r


# -- the shared feature cache and the warm start -------------------------------------------------------
def open_source(labels: str, base: dict):
    from dflash_lab.models.target import load_target
    from dflash_lab.train.store import TokenStore

    target = load_target(base["target"]["name"], dtype=base["target"]["dtype"])
    store = TokenStore.open_or_build(labels, target, base["data"]["max_length"], base["data"]["min_supervised"],
                                     progress=False)
    return target, store


def prefill(labels: str, cache_dir: str, base: dict) -> None:
    """Target features of every usable labelled sequence into the cache, exactly as the trainer
    stores them (its FeatureCache and FeatureSource), for the demo's one-layer draft."""
    import torch

    from dflash_lab.models.target import default_target_layer_ids
    from dflash_lab.train.data import FeatureCache
    from dflash_lab.train.trainer import FeatureSource

    target, store = open_source(labels, base)
    layer_ids = default_target_layer_ids(target.model.config.num_hidden_layers, base["draft"]["num_layers"])
    cache = FeatureCache(cache_dir, target.fingerprint, layer_ids, base["data"].get("feature_cache_dtype", "bfloat16"))
    source = FeatureSource(target, layer_ids, True, cache, torch.device("cpu"))
    started = time.time()
    for i in range(len(store)):
        source.get([store.sample(i)])
    print(f"prefill: {len(store)} sequences, {cache.misses} computed, layers {layer_ids}, "
          f"{time.time() - started:.0f} s", flush=True)


def warm_start_data(labels: str, base: dict, seeds: list[int], heldout: int, out: Path) -> Path:
    """The labelled records minus every sequence that the split of any of `seeds` holds out."""
    from dflash_lab.train.data import read_records
    from dflash_lab.train.loader import split_indices

    _, store = open_source(labels, base)
    held = {store.sample(int(i)).id for seed in seeds for i in split_indices(len(store), heldout, heldout, seed)[1]}
    records = [r for r in read_records(labels) if str(r.get("id", "")) not in held]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"warm start data: {len(records)} records ({len(held)} held out by seeds {seeds})", flush=True)
    return out


def warm_start(args, work: Path, seeds: list[int]) -> str:
    """The demo's stage 1 (kd, the target's last layer as the draft) for --warm-start-minutes,
    two threads, on the sequences no variant holds out; returns its final checkpoint."""
    base = recipe(str(work), args.warm_start_minutes, threads=2)
    data = warm_start_data(args.labels, base, seeds, args.heldout, work / "warm-start-data.jsonl")
    import yaml

    (work / "warm-start.yaml").write_text(yaml.safe_dump(base))
    out = work / "warm-start"
    cmd = [sys.executable, "-m", "dflash_lab", "train", "--config", str(work / "warm-start.yaml"), "--data", str(data),
           "--out", str(out), "--no-progress", f"data.feature_cache={args.feature_cache or work / 'cache' / 'warm-start'}"]
    with open(work / "warm-start.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env=_env())
    print(f"warm start: {summarise(out)}", flush=True)
    return str(out / "checkpoints" / "final")


# -- runs ---------------------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(args, work: Path, name: str, seed: int, run: str | None = None) -> list[str]:
    run = run or f"{name}-s{seed}"
    # without a shared cache each run fills its own inside its budget: the same footing for all
    cache = args.feature_cache or work / "cache" / run
    return [sys.executable, "-m", "dflash_lab", "train", "--config", str(work / "base.yaml"),
            "--data", args.labels, "--out", str(work / run), "--no-progress",
            f"data.feature_cache={cache}", f"train.seed={seed}", *args.set, *expand(VARIANTS[name])]


def eval_command(args, work: Path, run: str) -> list[str]:
    from dflash_lab.demo import PRESETS, TARGET

    sizes = PRESETS["default"]
    return [sys.executable, "-m", "dflash_lab", "eval", "--target", TARGET, "--draft",
            str(work / run / "checkpoints" / "final"), "--out", str(work / f"{run}.eval.json"),
            "--bench-dir", args.bench_dir, "--limit", str(sizes.eval_limit), "--selection", "paper",
            "--max-new-tokens", str(sizes.eval_max_new_tokens), "--no-db", "--quiet"]


def summarise(run_dir: Path) -> dict:
    """Steps, held-out tau of the final checkpoint, training slot-1 accuracy and loss (last 10
    steps); for DFlash2 also the training batches' selector-walk and unary-argmax tau."""
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    final = [m for m in metrics if m.get("name") == "final"]
    steps = [m for m in metrics if "acc_per_slot" in m][-10:]

    def mean(key, index=None):
        values = [m[key] if index is None else m[key][index] for m in steps if key in m]
        return sum(values) / len(values) if values else None

    step_s = [m["step_s"] for m in metrics if "step_s" in m]
    return {"steps": metrics[-1]["step"], "heldout_tau": final[-1].get("heldout_tau") if final else None,
            "heldout_unary_tau": final[-1].get("heldout_unary_tau") if final else None,
            "train_wall_s": sum(step_s),
            "acc1": mean("acc_per_slot", 0), "loss": mean("loss"),
            "train_selector_tau": mean("selector_tau"), "train_unary_tau": mean("unary_tau")}


def real_tau(path: Path) -> dict:
    """The builtin harness's pooled tau per benchmark and their mean; lossless or not."""
    res = json.loads(path.read_text())
    taus = {b: v["tau_pooled"] for b, v in res["benchmarks"].items()}
    lossless = all(v.get("lossless", True) is not False for v in res["benchmarks"].values())
    return {"real_tau": sum(taus.values()) / len(taus), "real_tau_by_bench": taus, "lossless": lossless}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (all its threads), from /proc; None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def last_step(run_dir: Path) -> int:
    """The last training step written to metrics.jsonl (one row per step on CPU), 0 before the first."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


class Job:
    """One child process (a training or an evaluation) and the CPU time it spent per training step."""

    def __init__(self, name: str, seed: int, run: str, cmd: list[str], log: Path, run_dir: Path | None = None):
        self.name, self.seed, self.run, self.run_dir = name, seed, run, run_dir
        self.log = open(log, "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=_env())
        self.started = time.time()
        self.samples: list[tuple[int, float]] = []  # (step, CPU seconds) while training

    def poll(self) -> bool:
        """True while running; samples (step, CPU time) of a training."""
        if self.proc.poll() is not None:
            return False
        if self.run_dir is not None:
            step, cpu = last_step(self.run_dir), cpu_seconds(self.proc.pid)
            if step and cpu is not None and (not self.samples or self.samples[-1][0] != step):
                self.samples.append((step, cpu))
        return True

    def cpu_per_step(self) -> float | None:
        """CPU seconds per step between the first step seen and the last one (set-up and the first
        step's warm-up excluded)."""
        first = next((x for x in self.samples if x[0] >= 2), None)
        if first is None or self.samples[-1][0] <= first[0]:
            return None
        return (self.samples[-1][1] - first[1]) / (self.samples[-1][0] - first[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run_rounds(jobs: list[tuple], parallel: int, start, loads: list[float], finished=None, until_step=None,
               timeout_s: float = 3600.0) -> None:
    """Start `parallel` jobs together and wait for all of them before the next round, so that the
    runs compared side by side share the machine the same way. `until_step`: stop a training once
    it has written that step (the calibration)."""
    jobs = list(jobs)
    while jobs:
        running = [start(*jobs.pop(0)) for _ in range(min(parallel, len(jobs)))]
        while running:
            time.sleep(2)
            loads.append(os.getloadavg()[0])
            for job in list(running):
                alive = job.poll()
                done = until_step is not None and job.samples and job.samples[-1][0] >= until_step
                if alive and not done and time.time() - job.started < timeout_s:
                    continue
                job.stop()
                running.remove(job)
                if finished is not None:
                    finished(job)


def calibrate(args, work: Path, names: list[str], loads: list[float]) -> dict[str, int]:
    """`--budget cpu`: each variant's CPU seconds per step (`--calibration-steps` after step 2, two variants
    side by side as in the runs), and the schedule length that spends `--minutes` of CPU time."""
    per_step = {}

    def start(name):
        run = f"calibrate-{name}"
        return Job(name, 0, run, train_command(args, work, name, 0, run=run), work / f"{run}.log", work / run)

    def finished(job):
        per_step[job.name] = job.cpu_per_step()
        print(f"calibrated {job.name}: {per_step[job.name]} CPU s per step", flush=True)

    run_rounds([(n,) for n in names], args.parallel, start, loads, finished, until_step=2 + args.calibration_steps)
    failed = [name for name, sec in per_step.items() if sec is None]
    if failed:
        sys.exit(f"calibration of {failed} wrote fewer than {2 + args.calibration_steps} steps; "
                 f"see {work}/calibrate-NAME.log")
    return {name: max(1, round(args.minutes * 60 / sec)) for name, sec in per_step.items()}


def run_all(args, work: Path, names: list[str], seeds: list[int], loads: list[float],
            steps: dict[str, int] | None = None) -> dict:
    """Every (variant, seed), `--parallel` at a time in rounds, one seed's variants side by side;
    then (with --real-tau) the evaluations, also `--parallel` at a time. `steps`: a fixed schedule
    per variant (`--budget cpu`) instead of the trainer's time budget."""
    rows = {}

    def start_training(name, seed):
        extra = [f"train.max_steps={steps[name]}"] if steps else []
        run = f"{name}-s{seed}"
        return Job(name, seed, run, train_command(args, work, name, seed) + extra, work / f"{run}.log", work / run)

    def trained(job):
        cps = job.cpu_per_step()
        rows[job.run] = {"variant": job.name, "seed": job.seed, "wall_s": time.time() - job.started,
                         **summarise(work / job.run), "cpu_per_step": cps}
        rows[job.run]["train_cpu_s"] = cps * rows[job.run]["steps"] if cps else None
        print(f"done {job.run}: {json.dumps(rows[job.run])}", flush=True)

    run_rounds([(n, s) for s in seeds for n in names], args.parallel, start_training, loads, trained,
               timeout_s=args.minutes * 180 + 900)
    evals = [(r["variant"], r["seed"]) for r in rows.values()
             if wants_real_tau(args, r["variant"]) and (work / f"{r['variant']}-s{r['seed']}" / "checkpoints" / "final").is_dir()]

    def start_eval(name, seed):
        run = f"{name}-s{seed}"
        return Job(name, seed, run, eval_command(args, work, run), work / f"{run}.log")

    def evaluated(job):
        path = work / f"{job.run}.eval.json"
        if path.is_file():
            rows[job.run].update(real_tau(path))
        print(f"evaluated {job.run}: {rows[job.run].get('real_tau')}", flush=True)

    run_rounds(evals, args.parallel, start_eval, loads, evaluated)
    return rows


def wants_real_tau(args, name: str) -> bool:
    return bool(args.real_tau) and (args.real_tau == "all" or name in args.real_tau.split(","))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(rows: dict, names: list[str], seeds: list[int], args, loads: list[float]) -> None:
    print(f"\n{'run':<22}{'steps':>7}{'train s':>9}{'train CPU s':>13}{'held-out tau':>14}{'train acc@1':>13}{'loss':>9}"
          f"{'sel/unary tau (train)':>24}{'held-out unary':>16}{'real tau':>10}{'wall s':>8}"
          f"   ({args.minutes} min of {args.budget} time each, {args.parallel} at a time, 1 thread each)")
    for seed in seeds:
        for name in names:
            r = rows.get(f"{name}-s{seed}")
            if r is None:
                continue
            sel = (f"{_fmt(r['train_selector_tau'])} / {_fmt(r['train_unary_tau'])}"
                   if r.get("train_selector_tau") is not None else "-")
            print(f"{name + '-s' + str(seed):<22}{r['steps']:>7}{r['train_wall_s']:>9.0f}{_fmt(r.get('train_cpu_s'), 0):>13}"
                  f"{_fmt(r['heldout_tau']):>14}{_fmt(r['acc1']):>13}"
                  f"{_fmt(r['loss']):>9}{sel:>24}{_fmt(r.get('heldout_unary_tau')):>16}"
                  f"{_fmt(r.get('real_tau'), 2):>10}{r['wall_s']:>8.0f}")
    # the noise: how far one variant's runs spread over seeds, and the paired differences
    print(f"\n{'variant':<18}{'mean held-out tau':>18}{'seed spread':>13}{'diff vs ' + names[0] + ' per seed':>32}"
          f"{'mean real tau':>15}")
    for name in names:
        taus = [rows[f"{name}-s{s}"]["heldout_tau"] for s in seeds if rows.get(f"{name}-s{s}", {}).get("heldout_tau")]
        diffs = [rows[f"{name}-s{s}"]["heldout_tau"] - rows[f"{names[0]}-s{s}"]["heldout_tau"] for s in seeds
                 if rows.get(f"{name}-s{s}", {}).get("heldout_tau") and rows.get(f"{names[0]}-s{s}", {}).get("heldout_tau")]
        reals = [rows[f"{name}-s{s}"]["real_tau"] for s in seeds if "real_tau" in rows.get(f"{name}-s{s}", {})]
        print(f"{name:<18}{_fmt(statistics.mean(taus) if taus else None):>18}"
              f"{_fmt(max(taus) - min(taus) if taus else None):>13}"
              f"{' '.join(f'{d:+.3f}' for d in diffs):>32}{_fmt(statistics.mean(reals) if reals else None, 2):>15}")
    if loads:
        print(f"\nload average (1 min) during the runs: min {min(loads):.1f}, mean {statistics.mean(loads):.1f}, "
              f"max {max(loads):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--variants", default="base,layers5,slots4x128,ce,lr5e-3,init-target")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--set", action="append", default=[], help="extra override for every variant")
    parser.add_argument("--seeds", default="0", help="comma list: every variant once per train.seed")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences (a count)")
    parser.add_argument("--init", default=None, help="warm start: every variant from this checkpoint (stage 2 recipe)")
    parser.add_argument("--warm-start-minutes", type=float, default=None,
                        help="train the --init checkpoint first: the demo's stage 1 for this long")
    parser.add_argument("--stage", choices=sorted(STAGE_NAMES), default=None,
                        help="the demo stage whose recipe the variants change (default: 2 with a warm start, else 1)")
    parser.add_argument("--feature-cache", default=None, help="one feature cache for every run (default: one per run)")
    parser.add_argument("--prefill", action="store_true", help="fill --feature-cache for every sequence first")
    parser.add_argument("--real-tau", nargs="?", const="all", default=None, metavar="VARIANTS",
                        help="also evaluate the final checkpoints on the demo's eval prompts (all variants, or a comma list)")
    parser.add_argument("--bench-dir", default=None, help="the benchmark files, for --real-tau")
    parser.add_argument("--budget", choices=["wall", "cpu"], default="wall",
                        help="wall: the trainer sizes each schedule to --minutes from three timed steps; cpu: a "
                             "calibration measures each variant's CPU seconds per step and fixes its schedule to "
                             "--minutes of CPU time (the same on an idle core, steadier on a shared machine)")
    parser.add_argument("--calibration-steps", type=int, default=5,
                        help="--budget cpu: steps timed per variant (after two warm-up steps)")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.real_tau not in (None, "all") and set(args.real_tau.split(",")) - set(names):
        parser.error(f"--real-tau {args.real_tau}: name variants of --variants ({args.variants})")
    if args.real_tau and not args.bench_dir:
        parser.error("--real-tau needs --bench-dir (the folder with the five benchmark files)")
    if args.prefill and not args.feature_cache:
        parser.error("--prefill needs --feature-cache DIR")
    if args.init and args.warm_start_minutes:
        parser.error("--init or --warm-start-minutes, not both")
    seeds = [int(s) for s in args.seeds.split(",")]
    import yaml

    work = Path(args.work or tempfile.mkdtemp(prefix="levers-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.feature_cache:
        args.feature_cache = str(Path(args.feature_cache).resolve())
    started = time.time()
    if args.prefill:
        prefill(args.labels, args.feature_cache, recipe(str(work), args.minutes))
    init = args.init or (warm_start(args, work, seeds) if args.warm_start_minutes else None)
    stage = STAGE_NAMES[args.stage or ("2" if init else "1")]
    base = recipe(str(work), args.minutes, stage=stage, init=str(Path(init).resolve()) if init else "scratch",
                  heldout=args.heldout, wall_budget=args.budget == "wall")
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    loads: list[float] = []
    steps = calibrate(args, work, names, loads) if args.budget == "cpu" else None
    rows = run_all(args, work, names, seeds, loads, steps)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "stage": stage, "init": init, "steps": steps,
                                                   "rows": rows, "load_average": loads,
                                                   "wall_s": time.time() - started}, indent=2))
    print(f"stage recipe: {stage}; init: {init or 'scratch'}; held-out sequences: {args.heldout}; budget: "
          f"{args.minutes} min of {args.budget} time (schedules {steps or 'sized by the trainer'}); "
          f"total wall {time.time() - started:.0f} s; results: {work / 'results.json'}")
    print_tables(rows, names, seeds, args, loads)


if __name__ == "__main__":
    main()
