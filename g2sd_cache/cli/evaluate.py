"""`g2sd-cache evaluate`: its flags and the line it prints."""
from __future__ import annotations

import os

from g2sd_cache.cli.command import Command


def add(sub):
    p = sub.add_parser(
        "evaluate", help="top-1 / top-5 of a classifier on labelled images",
        description="Accuracy with G2SD's evaluation transform (resize to S/0.875, centre crop S, bicubic). MODEL is "
                    "a `finetune` run folder (its best.pt, else its checkpoint.pt), either file, an export of one, or "
                    "any ViT classifier `load_classifier` reads (MAE fine-tuned, timm). The distilled student "
                    "averages its two heads. Example: g2sd-cache evaluate runs/sd-vit-s --val /data/imagenet/val")
    p.add_argument("model", help="run folder or weight file")
    p.add_argument("--val", required=True, help="class folders (indices from the training class names the run "
                   "recorded, else from --classes-from, else the folder's own sorted names) or .cls-labelled tars")
    p.add_argument("--classes-from", default=None, help="the training image folder, whose sorted class folders give "
                   "the class indices (for weight files that do not record them)")
    p.add_argument("--last", action="store_true", help="with a run folder: evaluate checkpoint.pt, not best.pt")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes (default min(8, CPUs): %(default)s here)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU), as G2SD evaluates")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args) -> int:
    import json

    from g2sd_cache.models.classifier import load_classifier
    from g2sd_cache.common.dist import resolve_device
    from g2sd_cache.specific.evaluate import evaluate
    from g2sd_cache.specific.finetuned import read_finetuned
    from g2sd_cache.data.labelled import LabelledFolder
    ft = read_finetuned(args.model, "evaluate", prefer_best=not args.last)
    if ft is not None:
        model, classes, source = ft.model, ft.classes, ft.describe()
    else:
        model, info = load_classifier(args.model, "evaluate")
        classes, source = None, info.source
    if args.classes_from:
        classes = LabelledFolder.scan(args.classes_from).classes
    device = resolve_device(args.device)
    r = evaluate(model.to(device), args.val, classes=classes, batch_size=args.batch_size, workers=args.workers,
                 device=str(device), amp=args.amp)
    if args.json:
        print(json.dumps(r | {"model": source}))
    else:
        print(f"{source} on {args.val}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f} "
              f"({r['n']} images)")
    return 0


COMMAND = Command("evaluate", add, run)
