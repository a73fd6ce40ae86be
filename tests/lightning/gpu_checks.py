"""CUDA checks of the callback: trained weights equal the hand-written ``loss + λ·R`` reference.

Runs each check in its own process (DeepSpeed and process groups keep global state) and prints a
markdown table; with ``--out FILE`` the table is also written there. Needs one CUDA device;
DeepSpeed rows need the ``deepspeed`` package (they are reported as skipped without it).

    python tests/lightning/gpu_checks.py --out gpu_checks_table.md   # then record the table in docs/gpu_checks.md

Every run trains ``TinyNet`` (``models.py`` beside this file) for a few steps with the MHE preset of
the papers. The reference is the penalty written by hand into ``training_step`` on a single
device in the same precision (fp32 for strategies; for ZeRO-3 and FSDP the hand-written form
would see weight shards, which is exactly what the callback avoids).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # models.py beside it
sys.path.insert(0, str(ROOT))

CHECKS = {
    # name: (strategy, precision, reference strategy, reference precision, tolerance)
    "single-fp32": ("auto", "32-true", "auto", "32-true", 1e-5),
    "single-bf16-mixed": ("auto", "bf16-mixed", "auto", "bf16-mixed", 1e-4),
    "single-fp16-mixed (GradScaler)": ("auto", "16-mixed", "auto", "16-mixed", 1e-4),
    "ddp (1 process, nccl)": ("ddp", "32-true", "auto", "32-true", 1e-5),
    "fsdp1 (1 process)": ("fsdp", "32-true", "auto", "32-true", 1e-5),
    "deepspeed stage 2": ("deepspeed_stage_2", "32-true", "auto", "32-true", 1e-5),
    "deepspeed stage 3": ("deepspeed_stage_3", "32-true", "auto", "32-true", 1e-5),
    # DeepSpeed's fp16 keeps fp16 weights with its own loss scaler (it skips steps that overflow):
    # torch autocast is no reference for it, the hand-written penalty in the same DeepSpeed run
    # is (ZeRO-2 keeps whole weights, so the hand-written form sees what the callback sees)
    "deepspeed stage 2, fp16": ("deepspeed_stage_2", "16-mixed", "deepspeed_stage_2", "16-mixed", 2e-3),
}


#: Result entry (not a weight) saying how the callback's penalties were computed.
PENALTIES_KEY = "__penalties__"


def _train(strategy: str, precision: str, kind: str, root: str) -> dict:
    import lightning.pytorch as pl
    from models import TinyNet, mhe_reference, trainer_kwargs

    from lightning_hsu import HypersphericalUniformity

    model = TinyNet(penalty=mhe_reference() if kind == "reference" else None)
    callbacks = [HypersphericalUniformity(preset="mhe", log=False)] if kind == "callback" else []
    kw = trainer_kwargs(
        root,
        accelerator=os.environ.get("HSU_ACCELERATOR", "gpu"),
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=4,
    )
    kw.pop("deterministic")
    # Lightning's distributed sampler shuffles; the single-device reference reads in order.
    kw["use_distributed_sampler"] = False
    trainer = pl.Trainer(callbacks=callbacks, **kw)
    trainer.fit(model)
    if strategy.startswith("deepspeed_stage_3"):
        import deepspeed

        # ZeRO-3 keeps partitions outside forward: gather the module's parameters to read them.
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    elif strategy == "fsdp":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = trainer.strategy.model
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            state = {k: v.detach().float().cpu() for k, v in wrapped.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    result = {k.replace("_forward_module.", "").replace("module.", ""): v.tolist() for k, v in state.items()}
    if kind == "callback":  # how the callback computed its penalties: replayed CUDA graphs or eagerly
        engine = callbacks[0].engine
        result[PENALTIES_KEY] = f"graph ({engine.graph_captures} capture)" if engine.graph_captures else "eager"
    return result


def run_one(name: str, kind: str, out: str) -> None:
    strategy, precision, ref_strategy, ref_precision, _ = CHECKS[name]
    if kind == "reference":
        strategy, precision = ref_strategy, ref_precision
    with tempfile.TemporaryDirectory() as root:
        weights = _train(strategy, precision, kind, root)
    Path(out).write_text(json.dumps(weights))


def _spawn(name: str, kind: str, workdir: Path) -> tuple[dict | None, str]:
    out = workdir / f"{abs(hash((name, kind)))}.json"
    env = dict(os.environ, MASTER_PORT=str(29500 + abs(hash((name, kind))) % 1000))
    proc = subprocess.run(
        [sys.executable, __file__, "--one", name, "--kind", kind, "--result", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    log_dir = os.environ.get("HSU_GPU_LOG_DIR")
    if log_dir:
        Path(log_dir, f"{name.split()[0]}-{name.split()[-1].strip('()')}-{kind}.log").write_text(proc.stderr[-20000:])
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, " / ".join(tail)[-300:]
    return json.loads(out.read_text()), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--only", nargs="*", help="names of checks to run (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.kind, args.result)
        return
    import torch

    dry_run = os.environ.get("HSU_ACCELERATOR") == "cpu"  # rehearsal of the script on a CPU machine
    if not torch.cuda.is_available() and not dry_run:
        sys.exit("gpu_checks.py needs a CUDA device")
    import lightning

    device = torch.cuda.get_device_name(0) if not dry_run else "CPU (dry run)"
    lines = [
        f"GPU checks on {device}, torch {torch.__version__}, lightning {lightning.__version__}",
        "",
        "| check | max abs diff vs hand-written reference | differs from no penalty | penalties | result | seconds |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        refs: dict[tuple[str, str], dict | None] = {}
        base, err = _spawn("single-fp32", "baseline", workdir)
        for name in args.only or list(CHECKS):
            start = time.time()
            reference = CHECKS[name][2:4]
            if reference not in refs:
                refs[reference], _ = _spawn(name, "reference", workdir)
            ours, err = _spawn(name, "callback", workdir)
            seconds = f"{time.time() - start:.0f}"
            ref = refs[reference]
            if ours is None or ref is None:
                lines.append(f"| {name} | – | – | – | error: {err.replace('|', '/')} | {seconds} |")
                continue
            how = ours.pop(PENALTIES_KEY, "–")
            diff = max(float((torch.tensor(ours[k]) - torch.tensor(ref[k])).abs().max()) for k in ref)
            moved = base is not None and any(
                not torch.allclose(torch.tensor(ours[k]), torch.tensor(base[k]), atol=1e-4) for k in base
            )
            ok = diff <= CHECKS[name][4] and moved
            lines.append(
                f"| {name} | {diff:.2e} | {'yes' if moved else 'NO'} | {how} | {'pass' if ok else 'FAIL'} | {seconds} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
