"""Merge throughput: adding one candidate to a running soup of a ResNet-50-sized state dict.

Side by side, in one process, interleaved round by round (a noisy machine slows all of
them alike), the median time of one merge for:

- raysoup's ``RunningSoup.add`` (one in-place ``torch._foreach_lerp_`` per dtype/device
  group into the fp32 running mean, the default; and with ``accum_dtype=float64``), and
  the greedy try ``RunningSoup.average_with(new, reuse=True)`` (the weights of soup +
  candidate that a greedy-soup trial evaluates, written into buffers kept between tries,
  as ``GroupSoup`` does), also with ``reuse=False`` (new tensors each time);
- the per-key dict averaging of the reference scripts, copied as they write it:
  DiWA / ModelRatatouille ``WA.add_weights``
  (``domainbed/algorithms_inference.py``: ``param_k.data = (param_k.data * global_count +
  param_q.data) / (1. + global_count)``), model soups' greedy step (``main.py``:
  ``{k: soup[k].clone() * (n / (n + 1.)) + new[k].clone() * (1. / (n + 1)) for k in new}``)
  and its uniform soup (``main.py``: ``{k: v * (1./N) + soup[k] for k, v in sd.items()}``);
- the memory-bandwidth floor on the same machine: one ``copy_`` of a flat fp32 tensor
  holding as many elements as the state dict, and a ``torch._foreach_copy_`` of the state
  dict's own tensors.

The reference idioms run over the floating tensors (parameters and BatchNorm statistics,
99.9998% of the bytes); ``RunningSoup`` also keeps its max of the integer buffers.

    python experiments/bench/merge_throughput.py
    python experiments/bench/merge_throughput.py --model raysoup --repeats 30 --device cuda
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from benchlib import (
    add_common_arguments,
    device_from_args,
    format_table,
    machine,
    median,
    quantile,
    script_parser,
    synchronize,
    write_rows,
)

State = dict[str, torch.Tensor]
MODELS = ("torchvision", "raysoup", "cnn")
FLOOR = "floor: copy_ (flat fp32)"
DIWA = "alexrame/diwa domainbed/algorithms_inference.py (= ModelRatatouille WA.add_weights)"
SOUPS = "mlfoundations/model-soups main.py"


def build_state(model: str, device: torch.device, seed: int = 0) -> State:
    """A ResNet-50 state dict with random weights (no download): torchvision's 1000-class
    one (25.6 M parameters) or raysoup's ``build_network("resnet50", 65)`` (23.6 M); ``cnn``
    is the built-in small network (0.1 M), for smoke tests."""
    torch.manual_seed(seed)
    if model == "torchvision":
        import torchvision

        network: torch.nn.Module = torchvision.models.resnet50(weights=None)
    elif model == "raysoup":
        from raysoup.models.networks import build_network

        network = build_network("resnet50", 65)
    elif model == "cnn":
        from raysoup.models.networks import build_network

        network = build_network("cnn", 10)
    else:
        raise ValueError(f"model {model!r}: expected one of {MODELS}")
    return {k: v.detach().to(device).clone() for k, v in network.state_dict().items()}


def perturbed(state: State, seed: int) -> State:
    """Another 'fine-tuning' of the same network: floating tensors plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=generator).to(v.device)
        if v.is_floating_point()
        else v.clone()
        for k, v in state.items()
    }


def floating(state: State) -> State:
    return {k: v for k, v in state.items() if v.is_floating_point()}


# ---------------------------------------------------------------- the reference idioms


def diwa_add_weights(soup: State, new: State, global_count: int) -> None:
    """DiWA / ModelRatatouille ``WA.add_weights``, per tensor, in place in the dict."""
    for k in soup:
        soup[k] = (soup[k] * global_count + new[k]) / (1.0 + global_count)


def soups_greedy_step(soup: State, new: State, num_ingredients: int) -> State:
    """model soups' potential greedy soup (``main.py``, Step 4)."""
    n = num_ingredients
    return {k: soup[k].clone() * (n / (n + 1.0)) + new[k].clone() * (1.0 / (n + 1)) for k in new}


def soups_uniform_step(soup: State, new: State, num_models: int) -> State:
    """model soups' uniform soup, one model added (``main.py``, Step 3)."""
    return {k: v * (1.0 / num_models) + soup[k] for k, v in new.items()}


# ---------------------------------------------------------------- the contenders


@dataclass
class Contender:
    name: str
    kind: str  # raysoup | reference | floor
    source: str
    merge: Callable[[], object]


def contenders(state: State, new: State, device: torch.device) -> list[Contender]:
    """Every merge to time, each a closure doing exactly one merge of ``new``."""
    from raysoup.soup.average import RunningSoup

    soup32 = RunningSoup(device=device)
    soup64 = RunningSoup(accum_dtype=torch.float64, device=device)
    trial = RunningSoup(device=device)
    for soup in (soup32, soup64, trial):
        soup.add(state)
    diwa = floating(state)
    float_new = floating(new)
    greedy = floating(state)
    uniform = {k: v * (1.0 / 72) for k, v in floating(state).items()}
    n_float = sum(v.numel() for v in diwa.values())
    flat_src = torch.randn(n_float, device=device)
    flat_dst = torch.empty_like(flat_src)
    copy_dst = [torch.empty_like(v) for v in float_new.values()]
    copy_src = list(float_new.values())

    def diwa_merge() -> None:
        diwa_add_weights(diwa, float_new, 1)

    return [
        Contender(
            FLOOR,
            "floor",
            "plain copy of the same number of bytes",
            lambda: flat_dst.copy_(flat_src),
        ),
        Contender(
            "floor: _foreach_copy_ (state's tensors)",
            "floor",
            "plain copy, per tensor",
            lambda: torch._foreach_copy_(copy_dst, copy_src),
        ),
        Contender(
            "raysoup RunningSoup.add (fp32 mean)",
            "raysoup",
            "default: _foreach_lerp_ in place",
            lambda: soup32.add(new),
        ),
        Contender(
            "raysoup RunningSoup.add (fp64 mean)",
            "raysoup",
            "accum_dtype=float64",
            lambda: soup64.add(new),
        ),
        Contender(
            "raysoup greedy try (average_with reuse)",
            "raysoup",
            "average_with(new, reuse=True), as GroupSoup tries",
            lambda: trial.average_with(new, reuse=True),
        ),
        Contender(
            "raysoup average_with (new tensors)",
            "raysoup",
            "average_with(new), reuse=False",
            lambda: trial.average_with(new),
        ),
        Contender("DiWA/Ratatouille add_weights", "reference", DIWA, diwa_merge),
        Contender(
            "model soups greedy step",
            "reference",
            SOUPS,
            lambda: soups_greedy_step(greedy, float_new, 2),
        ),
        Contender(
            "model soups uniform step",
            "reference",
            SOUPS,
            lambda: soups_uniform_step(uniform, float_new, 72),
        ),
    ]


def time_contenders(
    items: list[Contender], device: torch.device, repeats: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per merge, ``repeats`` each, in a shuffled order every round."""
    times: dict[str, list[float]] = {c.name: [] for c in items}
    order = list(items)
    rng = random.Random(seed)
    for round_ in range(warmup + repeats):
        rng.shuffle(order)
        for contender in order:
            synchronize(device)
            started = time.perf_counter()
            contender.merge()
            synchronize(device)
            elapsed = time.perf_counter() - started
            if round_ >= warmup:
                times[contender.name].append(elapsed)
    return times


def rows_from_times(
    items: list[Contender], times: dict[str, list[float]], state: State, model: str
) -> list[dict]:
    n_float = sum(v.numel() for v in state.values() if v.is_floating_point())
    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    floor = median(times[FLOOR])
    rows = []
    for c in items:
        seconds = median(times[c.name])
        rows.append(
            {
                "script": "merge_throughput",
                "method": c.name,
                "kind": c.kind,
                "source": c.source,
                "model": model,
                "n_params": n_float,
                "state_mb": state_bytes / 2**20,
                "repeats": len(times[c.name]),
                "median_ms": 1000 * seconds,
                "p10_ms": 1000 * quantile(times[c.name], 0.1),
                "p90_ms": 1000 * quantile(times[c.name], 0.9),
                "x_floor": seconds / floor,
                "state_gb_per_s": state_bytes / seconds / 1e9,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="torchvision",
        help="torchvision resnet50 (25.6 M params), raysoup's (65 classes), or cnn (tiny)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed merges per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a busy neighbour on a shared machine stalls "
        "multi-threaded ops far more than single-threaded ones)",
    )
    add_common_arguments(parser, "merge_throughput")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = device_from_args(parser, args.device)
    state = build_state(args.model, device, args.seed)
    new = perturbed(state, args.seed + 1)
    items = contenders(state, new, device)
    times = time_contenders(items, device, args.repeats, args.warmup, args.seed)
    info = machine(device)
    rows = [row | info for row in rows_from_times(items, times, state, args.model)]
    first = rows[0]
    print(
        f"one merge of a {args.model} state dict: {first['n_params'] / 1e6:.1f} M "
        f"floating values, {first['state_mb']:.0f} MB; {info['device']} "
        f"({info['device_name']}, {info['torch_threads']} torch threads), "
        f"median of {args.repeats}"
    )
    columns = [
        ("method", ""),
        ("median_ms", ".1f"),
        ("p10_ms", ".1f"),
        ("p90_ms", ".1f"),
        ("x_floor", ".2f"),
        ("state_gb_per_s", ".1f"),
    ]
    print(format_table(rows, columns))
    print(f"rows: {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
