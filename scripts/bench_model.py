"""Forward throughput of AG-CNN against a bare backbone, and of the region step alone.

Prints one JSON object. Everything is measured in the same process on the same device:

* ``bare``:        one backbone + pool + classifier, the reference an AG-CNN forward is judged by
                   (two backbones, so 0.5 x bare is the ceiling);
* ``agcnn``:       the full forward (global, region step, local, fusion);
* ``region_step``: heatmap -> mask -> largest component -> box -> crop, on features of the
                   right shape;
* ``cpu_loop``:    the region step done per image on the CPU with numpy / OpenCV / scikit-image,
                   the way earlier public code did it (including the device -> host copy).

With ``--compile`` it also times ``torch.compile`` of the bare network and of AG-CNN, and counts
the graph breaks of the AG-CNN forward with ``torch._dynamo.explain`` (the region step is meant
to be the only one).

    python scripts/bench_model.py --device cuda --batch-size 256 --dtype bf16 --channels-last --compile
    python scripts/bench_model.py --device cpu --batch-size 16 --backbone resnet18
"""

from __future__ import annotations

import argparse
import json
import signal
import time

import torch

from agcnn import __version__
from agcnn.models import AGCNN, Branch
from agcnn.models.roi import attention_boxes, attention_mask, crop_regions, largest_component_boxes
from benchutil import cpu_loop_region_step, device_name, measure, sync, versions


def naive_propagation(mask: torch.Tensor) -> int:
    """Plain min-label propagation (3x3 min-pool inside the mask until nothing changes).

    The simple batched algorithm, kept here only to measure against; returns its round count.
    """
    b, h, w = mask.shape
    fg = mask[:, None]
    big = float(h * w)
    labels = torch.where(fg, torch.arange(h * w, dtype=torch.float32, device=mask.device).reshape(1, 1, h, w), big)
    rounds = 0
    while True:
        rounds += 1
        new = torch.where(fg, -torch.nn.functional.max_pool2d(-labels, 3, stride=1, padding=1), big)
        if torch.equal(new, labels):
            return rounds
        labels = new


class _Stopped(Exception):
    pass


def _stopped(signum, frame):
    raise _Stopped()


def compiled(bare: torch.nn.Module, model: AGCNN, x: torch.Tensor, amp, device: torch.device, args) -> dict:
    """torch.compile of both networks: graph breaks of the AG-CNN forward, then throughput."""
    import torch._dynamo

    with torch.inference_mode(), amp:
        explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    out: dict = {
        "backend": args.compile_backend,
        "agcnn_graphs": explained.graph_count,
        "agcnn_graph_breaks": explained.graph_break_count,
        # Where each break happened, innermost frame last: the region step should be the only one.
        "agcnn_break_reasons": [f"{r.reason.splitlines()[0][:160]} @ {r.user_stack[-1].name if r.user_stack else '?'}"
                                for r in explained.break_reasons],
    }
    b = x.shape[0]
    for name, net in (("bare_forward", bare), ("agcnn_forward", model)):
        fn = torch.compile(net, backend=args.compile_backend)

        def run():
            with torch.inference_mode(), amp:
                fn(x)

        # The warm-up calls compile; their time is reported apart from the throughput.
        t0 = time.perf_counter()
        run()
        sync(device)
        out[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
        out[f"{name}_images_per_s"] = b / measure(run, device, iters=args.iters, warmup=args.warmup)["seconds"]
    out["agcnn_over_bare"] = out["agcnn_forward_images_per_s"] / out["bare_forward_images_per_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of both networks and count graph breaks")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; aot_eager traces the same graphs without generating code)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    b, s = args.batch_size, args.image_size
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt)

    bare = Branch(args.backbone, "none", "max", 14).to(device, memory_format=fmt).eval()
    model = AGCNN(14, backbone=args.backbone, image_size=s, local_size=s).to(device, memory_format=fmt).eval()
    with torch.inference_mode(), amp:
        feats = model.global_branch.forward_features(x)

    def run_bare():
        with torch.inference_mode(), amp:
            bare(x)

    def run_agcnn():
        with torch.inference_mode(), amp:
            model(x)

    def run_region():
        with torch.inference_mode():
            crop_regions(x, attention_boxes(feats, s), s, s)

    def run_loop():
        with torch.inference_mode():
            cpu_loop_region_step(feats, x, s, s, 0.7)

    t_bare = measure(run_bare, device, iters=args.iters, warmup=args.warmup)["seconds"]
    t_agcnn = measure(run_agcnn, device, iters=args.iters, warmup=args.warmup)["seconds"]
    t_region = measure(run_region, device, iters=args.iters, warmup=args.warmup)["seconds"]
    t_loop = measure(run_loop, device, iters=max(1, args.iters // 3))["seconds"]

    # The choices for the connected-components step, on the real masks of this batch.
    with torch.inference_mode():
        mask = attention_mask(feats, s)
        ccl = {"torch_hooking": measure(lambda: largest_component_boxes(mask, "torch"), device, iters=args.iters)["seconds"]}
        if device.type == "cpu":
            ccl["scipy_batched"] = measure(lambda: largest_component_boxes(mask, "scipy"), device, iters=args.iters)["seconds"]
        naive_rounds = naive_propagation(mask)
        ccl["naive_propagation"] = measure(lambda: naive_propagation(mask), device, iters=max(1, args.iters // 3))["seconds"]
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"agcnn": __version__, **versions()},
        "backbone": args.backbone,
        "batch_size": b,
        "image_size": s,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "images_per_s": {
            "bare_forward": b / t_bare,
            "agcnn_forward": b / t_agcnn,
            "region_step": b / t_region,
            "cpu_loop_region_step": b / t_loop,
        },
        "components_ms_per_batch": {k: 1000 * v for k, v in ccl.items()},
        "naive_propagation_rounds": naive_rounds,
        "ratios": {
            "agcnn_over_bare": t_bare / t_agcnn,
            "region_step_share_of_agcnn": t_region / t_agcnn,
            "region_step_speedup_over_cpu_loop": t_loop / t_region,
        },
    }
    if args.compile:
        # Compiling can outlast the caller's time limit (gpu_check.sh stops a step with SIGTERM):
        # then the eager results above still come out, with the reason the compiled ones do not.
        signal.signal(signal.SIGTERM, _stopped)
        try:
            result["compiled"] = compiled(bare, model, x, amp, device, args)
        except Exception as e:  # noqa: BLE001 - a compiler failure is a result to report, not a crash
            # torch.compile re-raises the stop wrapped in its own errors.
            stopped = isinstance(e, _Stopped) or "_Stopped" in str(e)
            result["compiled"] = {"error": "stopped by SIGTERM (the time limit) while compiling" if stopped
                                  else f"{type(e).__name__}: {e}"[:1000]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
