"""Data-parallel scaling of the trainer: one small job under torchrun with nproc_per_node 1 and 2
on CPU (gloo), or 1..number of GPUs with `--device cuda`.

Each run is `python -m torch.distributed.run --standalone --nproc-per-node N -m tid_core.train
--spec SPEC --run-dir DIR` on one pre-generated shapes dataset, as the worker starts it. The
batch size is per process (as in the service), so N processes train N times the images per
step. Every step is logged; the steady-state step time is read from the `time` of the `step`
events in DIR/events.jsonl after the first `--skip` steps, and the data-loading share from their
`data_wait` stat (time waiting for the next batch, mean over ranks). On CPU every run gets the
same cores in total: OMP_NUM_THREADS = cores / N. Runs alternate N within rounds; figures are
medians of rounds.

`--hosts N` adds the job as N hosts of one process each (`hosts_ratio`: its throughput over
that of one host with N processes, the same processes and threads). The hosts are network
namespaces on this machine (bench/netns.py; root only), each with its own address, running
torchrun with a c10d rendezvous on the first one's address, as the nodes of a job on several
worker hosts do. The cores are the same, so the ratio is the cost of gloo's traffic between
hosts (veth links and a bridge) against between the processes of one host (loopback).

    python bench/ddp.py [--quick] [--device cuda] [--hosts 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import harness, netns
from tid_core.data.synthetic import generate_shapes
from tid_core.events import read_events
from tid_core.launch import Rendezvous, torchrun_command
from tid_core.spec import JobSpec


def job_spec(args: argparse.Namespace, dataset: Path, nproc: int) -> JobSpec:
    """The benchmark's job; only `resources.nproc_per_node` differs between runs."""
    return JobSpec.model_validate(
        {
            "name": f"ddp-bench-{nproc}",
            "student": {"arch": "fcos", "backbone": args.backbone, "fpn_channels": args.fpn},
            "dataset": {"path": str(dataset), "input_size": args.image_size},
            "schedule": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "warmup_iters": 0,
                "log_every": 1,
                "eval_every": 0,
                "amp": args.device == "cuda",
            },
            "resources": {
                "nproc_per_node": nproc,
                "device": args.device,
                "num_workers": args.num_workers,
            },
        }
    )


RDZV_PORT = 29400  # on the first host: a fresh network namespace each run
HOSTS_TIMEOUT_S = 3600.0  # a node that hangs (a peer died in a collective) fails the run


@dataclass(frozen=True)
class Setup:
    """How one run is launched: processes per host, intra-op threads per process, hosts."""

    nproc: int
    threads: int
    reference: bool = False  # the one-thread reference run
    hosts: int = 1

    @property
    def processes(self) -> int:
        return self.nproc * self.hosts

    @property
    def key(self) -> str:
        if self.hosts > 1:
            return f"hosts{self.hosts}_nproc{self.nproc}"
        return "nproc1_1thread" if self.reference else f"nproc{self.nproc}"


def setups(args: argparse.Namespace) -> list[Setup]:
    """Each nproc with cores / nproc threads; on CPU also one process with one thread, the
    reference that shows whether threads or processes use the cores better; with `--hosts N`,
    N hosts of one process with cores / N threads each."""
    runs = [Setup(n, max(1, args.cores // n)) for n in args.nprocs]
    if args.device == "cpu" and args.cores > 1 and 1 in args.nprocs:
        runs.append(Setup(1, 1, reference=True))
    if args.hosts > 1:
        runs.append(Setup(1, max(1, args.cores // args.hosts), hosts=args.hosts))
    return runs


def run_on_hosts(setup: Setup, spec_path: Path, run_dir: Path, env: dict[str, str]) -> int:
    """One run as `setup.hosts` nodes, each its own host (a network namespace) with the run
    dir shared; 0, or the exit code of a failed node (the others are killed with their host:
    they would wait for it until the process group's timeout)."""
    with netns.hosts(setup.hosts) as network:
        endpoint = f"{network.hosts[0].address}:{RDZV_PORT}"
        run_id = f"ddp-bench-{uuid.uuid4().hex[:8]}"
        nodes = []
        for i, host in enumerate(network.hosts):
            rendezvous = Rendezvous(setup.hosts, endpoint, run_id, local_addr=host.address)
            cmd = torchrun_command(spec_path, run_dir, nproc=setup.nproc, rendezvous=rendezvous)
            with (run_dir / f"train.node{i}.log").open("wb") as out:
                node = host.popen(
                    cmd, cwd=harness.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
                nodes.append(node)
        deadline = time.monotonic() + HOSTS_TIMEOUT_S
        while True:
            codes = [node.poll() for node in nodes]
            if failed := [code for code in codes if code not in (None, 0)]:
                return failed[0]
            if None not in codes:
                return 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run_dir}: the nodes ran past {HOSTS_TIMEOUT_S} s")
            time.sleep(0.2)


def train_once(
    args: argparse.Namespace, dataset: Path, work: Path, setup: Setup
) -> dict[str, float]:
    """One torchrun run; its steady-state step time, data-wait share and wall time."""
    run_dir = work / f"run-{setup.key}-{time.monotonic_ns()}"
    run_dir.mkdir()
    spec_path = run_dir / "spec.json"
    spec_path.write_text(job_spec(args, dataset, setup.processes).model_dump_json())
    env = harness.child_env(OMP_NUM_THREADS=str(setup.threads))
    start = time.perf_counter()
    if setup.hosts > 1:
        code = run_on_hosts(setup, spec_path, run_dir, env)
    else:
        with (run_dir / "train.log").open("wb") as out:
            code = subprocess.run(
                torchrun_command(spec_path, run_dir, nproc=setup.nproc),
                cwd=harness.ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
    wall = time.perf_counter() - start
    if code != 0:
        logs = sorted(run_dir.glob("train*.log"))
        log = "".join(f.read_text(errors="replace")[-3000:] for f in logs)
        raise RuntimeError(f"{setup.key}: the trainer exited {code}:\n{log}")
    steps = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "step"]
    steady = steps[args.skip :]
    if len(steady) < 2:
        raise ValueError(f"{setup.key}: {len(steps)} steps, need more than --skip {args.skip}")
    step_s = (steady[-1]["time"] - steady[0]["time"]) / (steady[-1]["step"] - steady[0]["step"])
    data_wait = statistics.mean(e["stats"]["data_wait"] for e in steady[1:])
    return {"step_s": step_s, "data_frac": data_wait / step_s, "wall_s": wall}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[Setup, list[dict[str, float]]] = {setup: [] for setup in setups(args)}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = generate_shapes(
            Path(tmp) / "shapes",
            # every run trains one epoch; N processes share it, so it takes steps/N steps
            num_train=args.steps * args.batch_size,
            num_val=args.batch_size,
            image_size=args.image_size,
            seed=0,
        )
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for setup in order:
                runs[setup].append(train_once(args, dataset, Path(tmp), setup))
    result: dict[str, Any] = {}
    for setup, samples in runs.items():
        step_s = statistics.median(s["step_s"] for s in samples)
        figures = {
            "nproc": setup.processes,
            "hosts": setup.hosts,
            "threads": setup.threads,
            "step_s": round(step_s, 4),
            "images_per_s": round(args.batch_size * setup.processes / step_s, 2),
            "data_frac": round(statistics.median(s["data_frac"] for s in samples), 4),
            "wall_s": round(statistics.median(s["wall_s"] for s in samples), 1),
        }
        result.update({f"{setup.key}_{k}": v for k, v in figures.items()})
    base, top = args.nprocs[0], args.nprocs[-1]
    speedup = result[f"nproc{top}_images_per_s"] / result[f"nproc{base}_images_per_s"]
    result["speedup"] = round(speedup, 3)  # throughput, most processes vs the fewest
    result["efficiency"] = round(speedup * base / top, 3)  # per process
    if "nproc1_1thread_images_per_s" in result:
        ref = result[f"nproc{top}_images_per_s"] / result["nproc1_1thread_images_per_s"]
        result["speedup_vs_1thread"] = round(ref, 3)
    if args.hosts > 1:  # N hosts x 1 process against 1 host x N processes
        hosts = result[f"hosts{args.hosts}_nproc1_images_per_s"]
        result["hosts_ratio"] = round(hosts / result[f"nproc{args.hosts}_images_per_s"], 3)
    result["config"] = {k: v for k, v in vars(args).items() if k not in {"json", "quick"}} | {
        "setups": [setup.key for setup in runs],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"FCOS {cfg['backbone']}-FPN{cfg['fpn']}, batch {cfg['batch_size']} per process x "
        f"{cfg['image_size']} px, {cfg['device_name']}, {cfg['num_workers']} loader workers, "
        f"median of {cfg['rounds']} alternating rounds, steps after the first {cfg['skip']}"
    )
    print(
        f"{cfg['cores']} cores: OMP_NUM_THREADS = {cfg['cores']} / nproc (same cores in total), "
        f"OMP_WAIT_POLICY {cfg['omp_wait_policy']}"
    )
    print(
        f"{'hosts':>5}{'nproc':>6}{'threads':>9}{'step s':>9}{'images/s':>10}{'speedup':>9}"
        f"{'eff.':>7}{'data wait':>11}{'run wall s':>12}"
    )
    base = cfg["nprocs"][0]
    for key in cfg["setups"]:
        nproc = result[f"{key}_nproc"]
        speedup = result[f"{key}_images_per_s"] / result[f"nproc{base}_images_per_s"]
        reference = key == "nproc1_1thread"
        efficiency = "" if reference else f"{speedup * base / nproc:.2f}"
        print(
            f"{result[f'{key}_hosts']:>5}{nproc:>6}{result[f'{key}_threads']:>9}"
            f"{result[f'{key}_step_s']:>9.3f}"
            f"{result[f'{key}_images_per_s']:>10.1f}{speedup:>9.2f}{efficiency:>7}"
            f"{result[f'{key}_data_frac']:>11.1%}{result[f'{key}_wall_s']:>12.1f}"
            + ("  reference: one thread" if reference else "")
        )
    if "hosts_ratio" in result:
        n = cfg["hosts"]
        print(
            f"{n} hosts x 1 process (network namespaces, c10d, gloo over veth) against 1 host x "
            f"{n} processes: throughput ratio {result['hosts_ratio']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("Trainer throughput with 1 vs N processes.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nprocs", type=int, nargs="+", help="default: 1 2 (CPU), 1..GPUs")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--fpn", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24, help="steps of a 1-process run")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out")
    parser.add_argument("--num-workers", type=int, help="loader workers (default: 0 CPU, 4 GPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="also run N hosts x 1 process (network namespaces; root), against 1 host x N",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.fpn, args.batch_size, args.image_size = 64, 2, 64
        args.steps, args.skip, args.rounds = 12, 2, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.nprocs is None:
        args.nprocs = (
            list(range(1, torch.cuda.device_count() + 1)) if args.device == "cuda" else [1, 2]
        )
    if args.hosts > 1 and args.device == "cuda":
        parser.error("--hosts: CPU only (the hosts would share the GPUs)")
    args.nprocs = sorted(set(args.nprocs) | ({args.hosts} if args.hosts > 1 else set()))
    if args.num_workers is None:
        args.num_workers = 4 if args.device == "cuda" else 0
    if any(args.steps % n for n in args.nprocs) or args.steps // args.nprocs[-1] < args.skip + 2:
        parser.error(
            f"--steps {args.steps}: expected a multiple of every nproc {args.nprocs} that leaves "
            f"at least 2 steps per run after --skip {args.skip}"
        )
    result = measure(args)
    harness.report(result, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
