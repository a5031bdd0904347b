"""Stage 2 (specific distillation): what the logits cache saves, measured side by side in one run.

    python benchmarks/finetune.py [--quick] [--device auto|cpu|cuda] [--batch 16] [--reps 3] [--threads N]
                                  [--extract-images N] [--sections step,storage,extract] [--json OUT.json]

The finetune section of benchmarks/throughput.py, alone: online `FineTuner` steps (the fine-tuned teacher's
fp32 forward on the mixed batch, then the student's step) against cached ones (stored argmax labels), same
student and mixed groups, with the ideal speedup (t_teacher + t_student) / t_student; bytes per sample per
cached epoch of a real logits cache, projected for ImageNet-1k; extract-logits samples/s against the bare
teacher forward. What each figure means: benchmarks/sections/finetune.py. The JSON holds the section's figures (as
throughput's under `finetune`) and the machine.

Default pairs: ViT-B -> ViT-S and ViT-B -> ViT-T at 224 px (G2SD's); --quick uses micro models at 64 px
(seconds, for a smoke test: its ratios mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from g2sd_cache.benchmarks.common import loadavg, machine_info
from g2sd_cache.benchmarks.sections.finetune import finetune_profile, finetune_section
from g2sd_cache.benchmarks.report import finetune_markdown

PARTS = ("step", "storage", "extract")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="micro models at 64 px: a smoke test in seconds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch", type=int, default=None, help="samples per step, one mixing group (default 16 on CPU, "
                   "128 on CUDA)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per mode, after one warm-up (default 3)")
    p.add_argument("--extract-images", type=int, default=None, help="images for the extract measurement "
                   "(default 64 with --quick, else 128 on CPU, 4096 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); 1 keeps a "
                   "shared CPU machine's timings steady")
    p.add_argument("--sections", default=",".join(PARTS), help="comma-separated subset of step, storage, extract "
                   "(default all)")
    p.add_argument("--json", default=None, help="also write the figures and the machine to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from g2sd_cache.common.dist import resolve_device
    from g2sd_cache.common.errors import UserError

    parts = tuple(s.strip() for s in args.sections.split(","))
    for flag, value in (("--batch", args.batch), ("--reps", args.reps), ("--threads", args.threads),
                        ("--extract-images", args.extract_images)):
        if value is not None and value < 1:
            sys.exit(f"{flag} {value}: must be at least 1")
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        sys.exit(f"--sections: unknown section {unknown[0]}; choose from {', '.join(PARTS)}")
    try:
        device = resolve_device(args.device)
    except UserError as e:
        sys.exit(f"--device {args.device}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = finetune_profile(device, args.quick)
    over = {"batch": args.batch, "reps": args.reps, "extract_images": args.extract_images}
    prof = dataclasses.replace(prof, **{k: v for k, v in over.items() if v is not None})
    if prof.extract_images < prof.batch:
        sys.exit(f"--extract-images {prof.extract_images}: must be at least the batch, {prof.batch}")

    report = {"machine": machine_info(device), "device": str(device)}
    with tempfile.TemporaryDirectory(prefix="g2sd-finetune-") as tmp:
        report.update(finetune_section(Path(tmp), prof, device, parts))
    report["machine"]["loadavg_end"] = loadavg()
    m, la0, la1 = report["machine"], report["machine"]["loadavg_start"], report["machine"]["loadavg_end"]
    load = f", load {la0[0]:.1f} -> {la1[0]:.1f}" if la0 and la1 else ""
    print("\n".join(finetune_markdown(report, f"# Stage 2: specific distillation, online vs cached logits "
                                              f"({device}; {m['cpu_model']}, {m['usable_cores']} cores{load}, "
                                              f"torch {m['torch']}, {m['torch_threads']} threads)")))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
