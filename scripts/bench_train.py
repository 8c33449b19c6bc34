"""Training throughput of each AG-CNN stage next to a bare backbone training step.

Measures images/s of one optimizer step (forward, masked BCE, backward, SGD) for:

* ``bare``           -- a plain torchvision backbone + 14-way classifier on the global input
                        (the reference: stage I should be nearly as fast);
* ``global``         -- stage I (the "global" row of agcnn.stages);
* ``local``          -- stage II: frozen global branch, batched tensor region step
                        (agcnn.models.roi), local branch trained;
* ``local_cpu_loop`` -- stage II with the region step done per image on the CPU, the way earlier
                        AG-CNN code does it: heatmap to numpy, cv2 resize, threshold,
                        skimage.measure.label, crop, cv2 resize, back to a tensor;
* ``fusion``         -- stage III through both frozen branches every step;
* ``fusion_cached``  -- stage III on cached pool5 features (train.cache_fusion_features).

Each stage is the median of ``--steps`` timed steps (``benchutil.measure``). On CUDA it also
reports the peak memory of each. Prints one JSON object.

    python scripts/bench_train.py --device cuda --batch-size 64 --image-size 224 --steps 20
    python scripts/bench_train.py --device cpu --backbone resnet18 --image-size 128 --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision

from agcnn.config import ModelConfig
from agcnn.models import AGCNN
from agcnn.stages import apply_freezing, set_train_mode, stage_plan
from agcnn.train.step import train_step
from benchutil import cpu_loop_region_step, device_name, measure, rate, versions

K = 14


def time_steps(step, device: torch.device, steps: int, warmup: int, batch: int) -> dict:
    timing = measure(step, device, iters=steps, warmup=warmup)
    out = {"images_per_s": rate(batch, timing), "ms_per_step": round(1000 * timing["seconds"], 1)}
    if "peak_memory_gib" in timing:
        out["peak_memory_gib"] = timing["peak_memory_gib"]
    return out


def bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    mc = ModelConfig(backbone=args.backbone, local_size=args.local_size or args.image_size)
    highres = args.highres_size or args.image_size
    b = args.batch_size
    x = torch.randn(b, 3, highres, highres, device=device)
    y = (torch.rand(b, K, device=device) < 0.2).float()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    results: dict = {}

    def sgd(params):
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-3, momentum=0.9, weight_decay=1e-4)

    # -- bare backbone
    bare = getattr(torchvision.models, args.backbone)(num_classes=K).to(device, memory_format=fmt).train()
    opt = sgd(bare.parameters())
    xg = torch.nn.functional.interpolate(x, size=(args.image_size,) * 2, mode="bilinear", antialias=True).contiguous(memory_format=fmt)

    def bare_step():
        train_step(lambda: (bare(xg), y), opt, device=device, amp=args.amp)

    results["bare"] = time_steps(bare_step, device, args.steps, args.warmup, b)
    del bare, opt

    model = AGCNN.from_config(mc, num_classes=K, image_size=args.image_size).to(device, memory_format=fmt)

    def stage_step(name: str, branch: str, forward: str):
        plan = stage_plan(name)
        apply_freezing(model, plan)
        set_train_mode(model, plan)
        o = sgd(model.parameters())

        def step():
            train_step(lambda: (model(x, stage=forward).logits(branch), y), o, device=device, amp=args.amp)

        return step

    results["global"] = time_steps(stage_step("global", "global", "global"), device, args.steps, args.warmup, b)
    results["local"] = time_steps(stage_step("local", "local", "local"), device, args.steps, args.warmup, b)

    plan = stage_plan("local")
    apply_freezing(model, plan)
    set_train_mode(model, plan)
    o = sgd(model.parameters())

    def loop_logits():
        with torch.no_grad():
            g_map = model.global_branch.forward_features(model.global_input(x))
        crops = cpu_loop_region_step(g_map, x, model.image_size, model.local_size, model.threshold).contiguous(memory_format=fmt)
        return model.local_branch(crops), y

    def loop_step():
        train_step(loop_logits, o, device=device, amp=args.amp)

    results["local_cpu_loop"] = time_steps(loop_step, device, args.steps, args.warmup, b)
    results["fusion"] = time_steps(stage_step("fusion", "fusion", "fusion"), device, args.steps, args.warmup, b)

    g = torch.randn(b, model.global_branch.num_features, device=device)
    l = torch.randn(b, model.local_branch.num_features, device=device)
    o = sgd(model.fusion.parameters())

    def cached_step():
        train_step(lambda: (model.fuse(g, l), y), o, device=device, amp=False)

    results["fusion_cached"] = time_steps(cached_step, device, max(args.steps, 20), args.warmup, b)

    ref = results["bare"]["images_per_s"]
    ratios = {k: round(v["images_per_s"] / ref, 3) for k, v in results.items() if k != "bare"}
    ratios["local_vs_cpu_loop"] = round(results["local"]["images_per_s"] / results["local_cpu_loop"]["images_per_s"], 2)
    return {
        "device": device_name(device),
        "versions": versions(),
        "settings": {"backbone": args.backbone, "batch_size": b, "image_size": args.image_size, "highres_size": highres,
                     "local_size": mc.local_size, "steps": args.steps, "warmup": args.warmup,
                     "amp_bf16": bool(args.amp and device.type == "cuda"), "channels_last": args.channels_last},
        "stages": results,
        "relative_to_bare": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet18", "densenet121"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="global input side")
    p.add_argument("--highres-size", type=int, default=None, help="side of the copy the local branch crops from (default: image size)")
    p.add_argument("--local-size", type=int, default=None, help="local branch input side (default: image size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last tensors (default: on for CUDA, off for the CPU)")
    args = p.parse_args()
    if args.channels_last is None:
        args.channels_last = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    print(json.dumps(bench(args), indent=1))


if __name__ == "__main__":
    main()
