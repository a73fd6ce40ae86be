"""The callback and `torch.compile`: graph breaks it adds to a compiled model, and the step time.

A CIFAR-style ResNet-18 from `transformers.ResNetConfig` (random init, 32 px), compiled with
`torch.compile`, trained by the engine as the callback runs it on one device or under DDP (whole
weights: the penalties are computed after the forward, from the weights, outside the compiled
region). Printed: dynamo's graph-break count of the model's forward with and without the
engine's hooks installed, and the median time of a training step (forward, loss + penalty,
backward, SGD step) of the compiled and the eager model, each without and with the penalty,
interleaved (`benchmarks/_common.py`).

    python benchmarks/bench_compile.py                # batch 32, 1 thread
    python benchmarks/bench_compile.py --quick
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch._dynamo
from _common import machine, table, time_methods
from torch import nn

from lightning_hsu import PenaltyEngine
from lightning_hsu.rules import preset_rules


def resnet18() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(config)


class Logits(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = Logits(resnet18())
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    dynamo = torch._dynamo  # the public explain() lives there
    dynamo.reset()
    breaks_alone = dynamo.explain(model)(x).graph_break_count
    engine = PenaltyEngine(preset_rules("mhe"))
    engine.bind(model, tie_to_output=False)  # single device / DDP: whole weights
    engine.install_hooks()
    dynamo.reset()
    engine.begin_step(0)
    breaks_with = dynamo.explain(model)(x).graph_break_count
    engine.collect()
    engine.end_step()

    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(forward: nn.Module, penalised: bool) -> None:
        engine.enabled = penalised
        engine.begin_step(0)
        loss = nn.functional.cross_entropy(forward(x), y)
        penalty = engine.collect()
        engine.end_step()
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    methods = {
        "compiled, no penalty": lambda: step(compiled, False),
        "compiled, MHE preset": lambda: step(compiled, True),
        "eager, no penalty": lambda: step(model, False),
        "eager, MHE preset": lambda: step(model, True),
    }
    timings = time_methods(methods, torch.device("cpu"), 5 if args.quick else args.repeats, warmup=2)
    base = timings["compiled, no penalty"].wall
    rows = [[name, f"{t.wall * 1e3:.0f}", f"{t.wall / base:.2f}x"] for name, t in timings.items()]
    print(machine())
    print(f"ResNet-18 (transformers), 32 px, batch {args.batch}; {len(engine.bindings)} regularised layers")
    print(f"graph breaks of the compiled forward: {breaks_alone} alone, {breaks_with} with the engine's hooks\n")
    print(table(["step", "ms (median)", "vs compiled, no penalty"], rows))


if __name__ == "__main__":
    main()
