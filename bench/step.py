"""Training-step cost of WSCL + batch expansion against the plain CLIP step, in one run.

Both steps use the same ViLReF towers, the same batch and the same optimiser; they are timed in
interleaved repeats (alternating which goes first) and summarised by medians, so machine noise hits
both alike and the ratio is what we report. Inside the WSCL step every loss/queue call is timed on
its own (perf_counter, with a device sync on CUDA); the backward through the loss graph, which is
fused into the step's single backward, is measured on detached features of the same batch.

    .venv/bin/python bench/step.py --model small --batch 32 --queue 4096 --repeats 8 --threads 1

Prints JSON and writes bench/results/step.json (keys: clip_samples_per_s, wscl_samples_per_s,
step_ratio = WSCL step time / CLIP step time, loss_queue_share = loss + queue code / WSCL step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vilref_fed.memory import BatchExpansion  # noqa: E402
from vilref_fed.model import build_model  # noqa: E402
from vilref_fed.objectives import WSCLLoss, clip_loss  # noqa: E402

NUM_LABELS = 19
FINDINGS = [
    "no abnormality",
    "microaneurysms and dot haemorrhages",
    "hard exudates near the fovea",
    "enlarged cup to disc ratio",
    "tessellated fundus",
    "drusen at the macula",
    "laser scars",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", help="model config name (tiny, small, vilref-rn50, ...)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096, help="queue size K (DESIGN default 4096)")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps of each kind (interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1 is the least disturbed by a shared machine)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step.json")
    return parser.parse_args(argv)


def make_batch(model, batch: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random images at the model's size, report-like texts, and a skewed label distribution.

    Labels: 40% of samples are exactly "normal" and 10% carry no label at all, so false negatives
    (and refills) happen in every batch, as in screening data.
    """
    size = model.config.image_size
    images = torch.randn(batch, 3, size, size, generator=gen)
    picks = torch.randint(0, len(FINDINGS), (batch, 3), generator=gen).tolist()
    texts = [". ".join(FINDINGS[k] for k in row) for row in picks]
    tokens = model.tokenize(texts)
    labels = (torch.rand(batch, NUM_LABELS, generator=gen) < 0.12).float()
    kind = torch.rand(batch, generator=gen)
    labels[kind < 0.4] = 0.0
    labels[kind < 0.4, 0] = 1.0
    labels[(kind >= 0.4) & (kind < 0.5)] = 0.0
    return {
        "images": images.to(device),
        "input_ids": tokens["input_ids"].to(device),
        "attention_mask": tokens["attention_mask"].to(device),
        "labels": labels.to(device),
    }


class Stopwatch:
    """Wall and process-CPU clocks (with a device sync on CUDA), accumulating named sections of a step.

    On a shared CPU machine the wall clock mostly measures the other jobs; the process CPU time of a
    single-threaded torch run is what the step itself costs, so on CPU the ratios use it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.sections: dict[str, tuple[float, float]] = {}

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    @staticmethod
    def since(start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
        return end[0] - start[0], end[1] - start[1]

    def add(self, name: str, spent: tuple[float, float]) -> None:
        wall, cpu = self.sections.get(name, (0.0, 0.0))
        self.sections[name] = (wall + spent[0], cpu + spent[1])

    def timed(self, name: str, fn: Callable, *args, **kwargs):
        start = self.now()
        result = fn(*args, **kwargs)
        self.add(name, self.since(start, self.now()))
        return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)

    model = build_model(args.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    expansion = BatchExpansion(model, args.queue, model.config.embed_dim, NUM_LABELS).to(device)
    wscl = WSCLLoss(delta=1.0, gamma=1.0, lam=1.0, refill=True)
    batch = make_batch(model, args.batch, device, gen)
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]

    # a full queue, so every step refills (the steady state of training)
    while int(expansion.queue_filled) < args.queue:
        feats = torch.nn.functional.normalize(
            torch.randn(args.batch, 2 * model.config.embed_dim, generator=gen), dim=1
        )
        fill_labels = make_batch(model, args.batch, torch.device("cpu"), gen)["labels"]
        d = model.config.embed_dim
        expansion.enqueue(feats[:, :d].to(device), feats[:, d:].to(device), fill_labels.to(device))

    def clip_step(watch: Stopwatch) -> None:
        out = model(*inputs)
        loss = watch.timed("clip_loss_forward", clip_loss, **out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def wscl_step(watch: Stopwatch) -> None:
        out = model(*inputs)
        queue = watch.timed("queue_kwargs", expansion.queue_kwargs)
        loss = watch.timed("wscl_forward", wscl, **out, labels=labels, **queue)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        watch.timed("momentum_update", expansion.momentum_update, model)
        keys = watch.timed("momentum_encode", expansion.encode, *inputs)
        watch.timed("enqueue", expansion.enqueue, *keys, labels)

    def wscl_loss_backward(watch: Stopwatch) -> None:
        """The loss graph's share of the backward: WSCL forward+backward on detached features."""
        with torch.no_grad():
            out = model(*inputs)
        image = out["image_features"].detach().requires_grad_()
        text = out["text_features"].detach().requires_grad_()
        scale = out["logit_scale"].detach().requires_grad_()
        queue = expansion.queue_kwargs()
        loss = wscl(image, text, scale, labels, **queue)["loss"]
        start = watch.now()
        loss.backward()
        watch.add("wscl_backward", watch.since(start, watch.now()))

    for _ in range(args.warmup):
        clip_step(Stopwatch(device))
        wscl_step(Stopwatch(device))

    clock = 0 if device.type == "cuda" else 1  # index into (wall, cpu): see Stopwatch
    times: dict[str, list[tuple[float, float]]] = {"clip": [], "wscl": []}
    sections: dict[str, list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        order = ("clip", "wscl") if repeat % 2 == 0 else ("wscl", "clip")
        for kind in order:
            watch = Stopwatch(device)
            start = watch.now()
            (clip_step if kind == "clip" else wscl_step)(watch)
            spent = watch.since(start, watch.now())
            times[kind].append(spent)
            print(
                f"repeat {repeat + 1}/{args.repeats} {kind}: wall {spent[0]:.3f} s, cpu {spent[1]:.3f} s",
                file=sys.stderr,
                flush=True,
            )
            if kind == "wscl":
                wscl_loss_backward(watch)
                for name, value in watch.sections.items():
                    sections.setdefault(name, []).append(value)

    def med(values: list[tuple[float, float]], which: int) -> float:
        return statistics.median(v[which] for v in values)

    clip_s = med(times["clip"], clock)
    wscl_s = med(times["wscl"], clock)
    median = {name: med(values, clock) for name, values in sections.items()}
    loss_queue = median["queue_kwargs"] + median["wscl_forward"] + median["wscl_backward"] + median["enqueue"]
    wall_clip, wall_wscl = med(times["clip"], 0), med(times["wscl"], 0)
    result = {
        "clip_samples_per_s": round(args.batch / clip_s, 3),
        "wscl_samples_per_s": round(args.batch / wscl_s, 3),
        "step_ratio": round(wscl_s / clip_s, 4),
        "loss_queue_share": round(loss_queue / wscl_s, 5),
        "clip_step_ms": round(1000 * clip_s, 2),
        "wscl_step_ms": round(1000 * wscl_s, 2),
        "sections_ms": {name: round(1000 * value, 3) for name, value in sorted(median.items())},
        "momentum_share": round((median["momentum_update"] + median["momentum_encode"]) / wscl_s, 4),
        "clock": "wall (CUDA-synchronised)" if clock == 0 else "process CPU time",
        "wall": {
            "clip_samples_per_s": round(args.batch / wall_clip, 3),
            "wscl_samples_per_s": round(args.batch / wall_wscl, 3),
            "step_ratio": round(wall_wscl / wall_clip, 4),
        },
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "queue": args.queue,
            "embed_dim": model.config.embed_dim,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": str(device),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "wscl": wscl.extra_repr(),
            "mean_false_negatives_per_anchor": round(float(wscl.last_stats["false_negatives"]), 3),
            "mean_refilled_per_anchor": round(float(wscl.last_stats["refilled"]), 3),
        },
        "definitions": {
            "step_ratio": "median WSCL step time / median CLIP step time (same model, batch, optimiser)",
            "loss_queue_share": "(queue_kwargs + WSCL forward + WSCL backward + enqueue) / WSCL step time",
            "momentum_share": "(momentum_update + momentum encoder forward) / WSCL step time",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
