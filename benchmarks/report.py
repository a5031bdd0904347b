"""The report of benchmarks/throughput.py: markdown tables of every section and the bar-chart figure.
What each figure means is said in the section's module (bench_step, bench_data, ...)."""
from __future__ import annotations

import math

import numpy as np


def fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def short(name: str) -> str:
    for k, v in (("vit_base", "B"), ("vit_large", "L"), ("vit_huge", "H"), ("vit_small", "S"), ("vit_tiny", "T"),
                 ("micro", "micro")):
        if k in name:
            return v
    return name


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _step(st: dict, d: dict, mi: dict) -> list[str]:
    out = ["## 1. Step: online vs cached G2SD", "",
           f"`Distiller.step` as train builds it, batch {st['batch_size']}, {st['precision']}, cached from a "
           f"{st['cache_codec']} cache {'with' if st['cache_pixels'] else 'without'} pixels; medians of "
           f"{st['rounds']} interleaved rounds (after {st['warm_rounds']} warm-up), {st['timed_steps_per_cell']} "
           f"timed step(s) per cell; speedup, ideal and efficiency are per-round ratios, then the median.", ""]
    out.append(table(["teacher → student", "online samples/s", "cached samples/s", "speedup (range)", "ideal",
                      "efficiency", "teacher alone ms", "student alone ms", "online − (teacher+student) ms",
                      "cached − student ms", "data wait online / cached"],
                     [[f"{short(p['teacher'])} → {short(p['student'])}", fmt(p["online_samples_per_s"], ".2f"),
                       fmt(p["cached_samples_per_s"], ".2f"),
                       f"{p['speedup']:.2f}x ({p['speedup_min']:.2f}–{p['speedup_max']:.2f})",
                       f"{p['ideal_speedup']:.2f}x", f"{p['efficiency']:.2f}", fmt(p["t_teacher_ms"], ".0f"),
                       fmt(p["t_student_ms"], ".0f"), fmt(p["online_overhead_ms"], "+.0f"),
                       fmt(p["cached_overhead_ms"], "+.0f"),
                       f"{100 * p['online_data_wait_frac']:.0f} % / {100 * p['cached_data_wait_frac']:.0f} %"]
                      for p in st["pairs"]]))
    su, b = st["loader_startup_s"], st["batch_size"]
    out += ["", f"Online steps decode images in {st['workers']} DataLoader worker(s), which on a small CPU box "
            f"compete with torch's {mi['torch_threads']} threads for the cores; cached steps read pixels and targets "
            f"on a background thread. Epoch start-up, excluded from the timed steps: online "
            f"{fmt(float(np.median(su['online'])) if su['online'] else None, '.2f')} s, cached "
            f"{fmt(float(np.median(su['cached'])) if su['cached'] else None, '.2f')} s. A batch of {b} costs the "
            f"input pipeline {b * 1e3 / d['image_only_samples_per_s']:.0f} ms of CPU on the image path and "
            f"{b * 1e3 / d['cached_samples_per_s']:.1f} ms on the cached pixel path (section 2)."]
    out += ["", "Student step, synchronised per part (ms):", ""]
    out.append(table(["student", "forward", "loss + backward", "AdamW"],
                     [[short(k), *(fmt(v.get(p), ".1f") for p in ("forward", "loss + backward", "adamw"))]
                      for k, v in st["student_breakdown_ms"].items()]))
    out += ["", "FLOPs per sample (torch.utils.flop_counter; students: forward + backward at mask 0.75; teachers: "
            "the target forward): " + ", ".join(f"{k} {v:.2f} GFLOP" for k, v in st["gflop_per_sample"].items()) + "."]
    return out


def _data(d: dict) -> list[str]:
    img = d["image_only_samples_per_s"]
    paths = [("image path: decode + crop + flip + visible patches (online G2SD, replay)", img),
             ("cached, `--pixels none`: the same + cached targets", d["no_pixels_samples_per_s"]),
             ("cached pixel path (default): pixels + targets from the cache", d["cached_samples_per_s"]),
             ("  the same, first read of a freshly opened cache (crc32c checks)", d["cached_first_read_samples_per_s"])]
    out = ["## 2. Data pipeline, per core", "",
           f"train's StepLoader, workers=0, torch at 1 thread, batch {d['batch_size']}, {d['codec']} targets; rates per "
           f"CPU-second of this process (all threads). Reads come from the page cache.", ""]
    out.append(table(["input path", "views/s per core", "ms per view", "vs image path"],
                     [[name, fmt(r, ",.0f"), fmt(1e3 / r, ".3f"), f"{r / img:.1f}x"] for name, r in paths]))
    out += ["", f"The pixel path moves {d['view_bytes']:,} B per view: {d['cached_gb_per_s']:.2f} GB/s per core, "
            f"{d['cached_vs_memcpy']:.2f}x a numpy memcpy of the same batches from DRAM ({d['memcpy_gb_per_s']:.2f} GB/s). "
            "Where a batch's time goes (ms of CPU per batch, each array's Cache.take alone): " +
            ", ".join(f"{k} {v:.3f}" for k, v in d["read_ms_per_batch"].items()) + "."]
    est = d["feed_rate_is_estimate"]
    out += ["", f"Cores to feed one GPU training {d['feed_student']} at {d['feed_rate_samples_per_s']:,.0f} samples/s"
            f"{' (ESTIMATE)' if est else ''} — {d['feed_rate_basis']}:", ""]
    out.append(table(["input path", "cores per GPU" + (" (estimate)" if est else "")],
                     [["image path", fmt(d["feed_cores_per_gpu"]["image"], ".1f")],
                      ["cached pixel path", fmt(d["feed_cores_per_gpu"]["cached"], ".2f")]]))
    if "feed_cores_per_gpu_by_student" in d:
        codecs_ = list(d["cached_samples_per_s_by_codec"])
        out += ["", "The cached pixel path per target codec (views/s per core; the low-rank decode runs on the device, "
                f"{d['lowrank_decode_ms_per_batch']:.2f} ms per batch of {d['batch_size']} here), and cores per GPU at "
                "each student's rate" + (" (ESTIMATE)" if est else "") + ":", ""]
        out.append(table(["", *codecs_], [["views/s per core", *(fmt(d["cached_samples_per_s_by_codec"][c], ",.0f")
                                                                  for c in codecs_)]] +
                         [[f"cores per GPU, {short(s)}", *(fmt(v[c], ".2f") for c in codecs_)]
                          for s, v in d["feed_cores_per_gpu_by_student"].items()]))
    r = d.get("remote") or {}
    if "skipped" in r:
        out += ["", f"From an object store: skipped ({r['skipped']})."]
    elif r:
        out += ["", f"From an object store ({r['endpoint']}, through the node-local copy, {r['download_threads']} "
                f"download threads, {r['prefetch_files']} files ahead): cold local copy {r['cold_samples_per_s']:,.0f} "
                f"views/s per core ({r['cold_wall_samples_per_s']:,.0f} by the clock), warm {r['warm_samples_per_s']:,.0f}; "
                f"first batch {r['first_batch_s']['cold']:.2f} s cold, {r['first_batch_s']['warm']:.3f} s warm; fetched "
                f"{r['fetched_per_epoch_share']:.2f}x the epoch's share of the cache; downloads cost "
                f"{r['download_cpu_s_per_gb']:.1f} CPU-s per GB."]
    return out


def _storage(s: dict) -> list[str]:
    est = " (estimate)" if s["feed_rate_is_estimate"] else ""
    out = ["## 4. Storage per codec", "",
           f"Caches of {s['fp16']['views']} views written by run_extract ({short(s['teacher'])} teacher, T={s['tokens']}, "
           f"D={s['target_dim']}, pixels stored); RMS error on {s['error_views']} float32 targets of a random-weight "
           f"teacher on synthetic images (real MAE features have outlier channels: re-check on your teacher). Read "
           f"bandwidth per GPU at {s['feed_rate_samples_per_s']:,.0f} samples/s{est}.", ""]
    out.append(table(["codec", "bytes/view on disk", "targets", "pixels", "targets by formula", "targets vs fp16",
                      "rel RMSE %", "ImageNet K=1 GB", "K=4 GB", "K=10 GB", f"GB/s per GPU{est}"],
                     [[n, fmt(c["bytes_per_view"], ",.0f"), fmt(c["target_bytes_per_view"], ",.0f"),
                       fmt(c["pixel_bytes_per_view"], ",.0f"), fmt(c["formula_target_bytes_per_view"], ",.0f"),
                       f"{c['target_vs_fp16']:.3f}x", fmt(None if c["rel_rmse"] is None else 100 * c["rel_rmse"], ".3f"),
                       *(fmt(c["imagenet_gb"][k], ",.0f") for k in ("1", "4", "10")),
                       fmt(c["read_gb_per_s_per_gpu"], ".2f")] for n, c in ((n, s[n]) for n in s["codecs"])]))
    out += ["", "pcaR: low-rank codes in a basis each cache fits on its own first views (its error above is on other "
            "views' targets); the basis (" + ", ".join(f"{n} {s[n]['basis_bytes']:,} B" for n in s["codecs"]
                                                      if s[n].get("basis_bytes")) + ") is stored once per cache, "
            "left out of bytes/view."]
    return out


def _extract(e: dict) -> list[str]:
    out = ["## 5. Extract vs the bare teacher", "",
           f"{short(e['teacher'])} teacher, batch {e['batch_size']}, {e['workers']} worker(s), {e['views_per_image']} views "
           f"per image, pixels {e['pixels']}; the bare teacher runs normalise + targets on the same batches (the first "
           f"{e['teacher_only_views']} views). Medians of {len(e['rounds'])} rounds, ratios within a round; the "
           f"difference of two extracts removes worker start-up, pipeline filling and the last shard's write.", ""]
    out.append(table(["measure", "views/s", "vs bare teacher"], [
        [f"run_extract end to end ({e['views']} views, {e['seconds']:.1f} s)", fmt(e["views_per_s"], ".1f"),
         f"{e['ratio']:.2f}x"],
        [f"run_extract steady state ({e['views']} − {e['small_views']} views; fixed cost "
         f"{fmt(e['fixed_cost_s'], '.2f')} s)", fmt(e["steady_views_per_s"], ".1f"), f"{fmt(e['steady_ratio'], '.2f')}x"],
        ["bare teacher forward", fmt(e["teacher_only_views_per_s"], ".1f"), "1.00x"]]))
    return out


def finetune_markdown(f: dict, title: str = "## 6. Finetune: stage 2, online vs cached teacher logits") -> list[str]:
    """The finetune section (benchmarks/sections/finetune.py): step, storage and extract, those that ran."""
    out = [title]
    if "step" in f:
        out += ["", f"`FineTuner.step` per sample (ms), {f['step'][0]['precision']} student, fp32 teacher; medians of "
                f"{f['config']['reps']} rounds after a warm-up, the three timed in turn on the same mixed group.", ""]
        out.append(table(["teacher → student", "batch", "teacher forward", "online step", "cached step", "speedup",
                          "ideal (t_teacher + t_student) / t_student", "efficiency"],
                         [[f"{short(s['teacher'])} → {short(s['student'])}", s["batch"],
                           *(fmt(1e3 * s[k], ".1f") for k in ("teacher_s_per_sample", "online_s_per_sample",
                                                               "cached_s_per_sample")),
                           f"{s['speedup']:.2f}x", f"{s['ideal_speedup']:.2f}x", f"{s['efficiency']:.2f}"]
                          for s in f["step"]]))
    if "storage" in f:
        st = f["storage"]
        out += ["", f"Logits cache (top-{st['topk']} fp16 logits + uint16 classes + uint16 argmax): payload "
                f"{st['payload_bytes_per_sample']} B per sample per cached epoch; {st['measured_bytes_per_sample']:.2f} B "
                f"on disk ({st['measured_samples']} samples in one shard, zarr metadata {st['metadata_bytes_per_shard']} "
                f"B per shard); ImageNet-1k: {st['imagenet_bytes_per_sample']:.2f} B per sample, "
                f"{st['imagenet_mb_per_epoch']:.1f} MB per cached epoch."]
    if "extract" in f:
        e = f["extract"]
        where = f"{e['workers']} DataLoader worker(s), their start-up included" if e["workers"] else "in-process"
        out += ["", f"extract-logits ({short(e['teacher'])} teacher, {e['samples']} samples, {where}): "
                f"{e['extract_samples_per_s']:.2f} samples/s end to end against the bare teacher forward's "
                f"{e['teacher_only_samples_per_s']:.2f}: {e['ratio']:.2f}x; inside extract the teacher ran at "
                f"{e['teacher_inside_extract_samples_per_s']:.2f} samples/s; a mixed sample (decode, augment, mix) "
                f"costs {1e3 * e['data_s_per_sample']:.1f} ms of one core to build."]
    return out


def markdown(rep: dict) -> str:
    mi = rep["machine"]
    la0, la1 = mi.get("loadavg_start"), mi.get("loadavg_end")
    out = [f"# g2sd-cache throughput — {rep['profile']} profile on {mi['device']}", "",
           f"Machine: {mi['cpu_model']}, {mi['usable_cores']} usable cores, torch {mi['torch']} "
           f"({mi['torch_threads']} threads), GPU: {mi['gpu'] or 'none'}; load average (1 min) "
           f"{fmt(la0[0] if la0 else None, '.2f')} at start, {fmt(la1[0] if la1 else None, '.2f')} at end; "
           f"run took {rep['runtime_s']:.0f} s.", ""]
    out += _step(rep["step"], rep["data"], mi) + [""] + _data(rep["data"])
    out += ["", "## 3. Loss", "", rep["loss"]["markdown"], ""] + _storage(rep["storage"]) + [""] + _extract(rep["extract"])
    out += [""] + finetune_markdown(rep["finetune"])
    out += ["", "## Targets", ""]
    out.append(table(["what", "target", "measured", ""],
                     [[r["what"], r["target"], r["value"], r["status"]] for r in rep["targets"]]))
    return "\n".join(out)


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, d, mi = rep["step"], rep["data"], rep["machine"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1.2, 1]})
    x = np.arange(len(st["pairs"]))
    a1.bar(x - 0.27, [p["online_samples_per_s"] for p in st["pairs"]], 0.27, label="online (teacher in the loop)")
    a1.bar(x, [p["cached_samples_per_s"] for p in st["pairs"]], 0.27, label="cached (g2sd-cache)")
    a1.bar(x + 0.27, [p["online_samples_per_s"] * p["ideal_speedup"] for p in st["pairs"]], 0.27, color="none",
           edgecolor="gray", hatch="//", label="ideal: online × (t_teacher + t_student) / t_student")
    for xi, p in zip(x, st["pairs"]):
        a1.text(xi, p["cached_samples_per_s"], f"{p['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(x, [f"{short(p['teacher'])}→{short(p['student'])}" for p in st["pairs"]])
    a1.set_ylabel("samples/s")
    a1.set_title(f"Training step, batch {st['batch_size']}, {st['precision']} ({mi['device']})")
    a1.legend(fontsize=8)
    rates = [d["image_only_samples_per_s"], d["no_pixels_samples_per_s"], d["cached_samples_per_s"]]
    a2.bar(["image path", "cached,\n--pixels none", "cached\npixel path"], rates, color=["C0", "C0", "C1"])
    a2.set_yscale("log")
    for i, r in enumerate(rates):
        a2.text(i, r, f"{r:,.0f}", ha="center", va="bottom", fontsize=8)
    a2.set_ylabel("views/s per core (log)")
    a2.set_title(f"Input pipeline per core ({d['pixel_cache_speedup']:.0f}x)", fontsize=10)
    cores = [d["feed_cores_per_gpu"]["image"], d["feed_cores_per_gpu"]["cached"]]
    a3.bar(["image path", "cached\npixel path"], cores, color=["C0", "C1"])
    for i, c in enumerate(cores):
        a3.text(i, c, f"{c:.1f}", ha="center", va="bottom", fontsize=8)
    a3.set_ylabel("CPU cores per GPU")
    a3.set_title(f"Cores to feed one GPU\nat {d['feed_rate_samples_per_s']:,.0f} samples/s"
                 f"{' (estimate)' if d['feed_rate_is_estimate'] else ''}", fontsize=10)
    fig.suptitle(f"{mi['cpu_model']}, {mi['usable_cores']} cores; GPU: {mi['gpu'] or 'none'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
