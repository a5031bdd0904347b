"""`g2sd-cache inspect CACHE`: what a cache holds, what it costs per view, and what each codec loses."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from g2sd_cache.cache import codecs
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.common.errors import CacheCorruptError


def inspect_report(path: str, sample_views: int = 64) -> dict:
    """Figures for the inspect command. Codec errors come in two kinds:
    - `extract_error`: every codec against the teacher's float32 targets, measured during extraction;
    - `stored_error`: every codec re-applied to a sample of the stored targets (decoded to float32),
      i.e. what re-encoding this cache would lose on top of its own codec."""
    cache = open_cache(path)
    m = cache.manifest
    on_disk = sum(sum(s.files.values()) for s in m.shards)

    def stored(*arrays: str) -> float:   # bytes per view on disk of these arrays (chunk files and metadata)
        return sum(n for s in m.shards for rel, n in s.files.items() if rel.split("/")[0] in arrays) / max(1, m.views)

    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(cache), size=min(sample_views, len(cache)), replace=False).tolist()) if len(cache) else []
    # A damaged chunk must not hide the rest of the cache: sample around it and name it.
    rows, corrupt = [], []
    for i in picks:
        try:
            rows.append(cache[i].target)
        except CacheCorruptError as e:
            if str(e) not in corrupt:
                corrupt.append(str(e))
    targets = torch.stack(rows) if rows else None
    shown = {n: c for n, c in {**codecs.CODECS, m.codec: cache.codec}.items() if c.fits(m.target_dim)}
    # low-rank codecs: the cache's own basis for its codec, a basis fitted on the sample for the others
    stored_error = ({name: codecs.codec_error(c, targets, cache.basis if name == m.codec else None)
                     for name, c in shown.items()} if targets is not None else {})
    return {
        "teacher": dataclasses.asdict(m.teacher), "teacher_precision": m.teacher_precision,
        "target_layer": m.target_layer,
        "geometry": dataclasses.asdict(m.geometry), "codec": m.codec, "pixels": m.pixels,
        "views_per_image": m.views_per_image, "seed": m.seed, "images": m.images, "views": m.views,
        "shards": len(m.shards), "skipped": len(m.skipped), "source": dataclasses.asdict(m.source),
        "versions": m.versions, "tokens": m.tokens, "target_dim": m.target_dim,
        "bytes": on_disk, "bytes_per_view": on_disk / max(1, m.views),
        "stored_target_bytes_per_view": stored("target", "scale"), "stored_pixel_bytes_per_view": stored("pixels", "jpeg", "lossless"),
        "pixel_encoding": m.pixel_encoding,
        "target_bytes_per_view": cache.codec.bytes_per_view(m.tokens, m.target_dim),
        "extract_error": m.codec_error, "stored_error": stored_error, "sampled_views": len(rows),
        "calibration": m.calibration, "basis": m.basis, "corrupt": corrupt,
    }


def format_report(r: dict) -> str:
    t = r["teacher"]
    lines = [
        f"teacher        {t['arch']}  ({t['source']}, sha256 {t['sha256'][:16]}...), ran in {r['teacher_precision']}",
        f"target         LN(decoder block {r['target_layer']}), {r['tokens']} tokens x {r['target_dim']}, codec {r['codec']}",
        f"views          {r['views']} ({r['images']} images x {r['views_per_image']} views, seed {r['seed']}) "
        f"in {r['shards']} shards; {r['skipped']} inputs skipped",
        f"geometry       {r['geometry']['img_size']}px, patch {r['geometry']['patch_size']}, "
        f"mask ratio {r['geometry']['mask_ratio']}",
        f"source         {r['source']['kind']} {r['source']['root']} ({r['source']['count']} inputs)",
        f"size           {r['bytes'] / 2**20:.1f} MiB on disk, {r['bytes_per_view']:.0f} B/view: targets "
        f"{r['stored_target_bytes_per_view']:.0f} (codes {r['target_bytes_per_view']}), pixels "
        f"{r['stored_pixel_bytes_per_view']:.0f}" + _pixel_note(r["pixels"], r["pixel_encoding"]),
        "",
    ]
    # the codecs that can code this cache's targets (a tiered pcaA+B+C may keep more coefficients than the width)
    names = [n for n in dict.fromkeys([*codecs.CODECS, r["codec"]]) if codecs.get_codec(n).fits(r["target_dim"])]
    w = max(6, *(len(n) for n in names))
    lines.append(f"{'codec':{w}s}  rel RMSE vs fp32 (extract)   cosine     rel RMSE vs stored ({r['sampled_views']} views)")
    for name in names:
        e, s = r["extract_error"].get(name), r["stored_error"].get(name)
        lines.append(f"{name:{w}s}  {_pct(e, 'rel_rmse'):>26s}   {_f(e, 'cosine'):>8s}   {_pct(s, 'rel_rmse'):>12s}")
    lines += [f"CORRUPT        {c}" for c in r.get("corrupt", ())]
    if r["basis"]:
        lines += ["", f"basis          {r['basis']['file']} float32 {r['basis']['shape']}, sha256 "
                      f"{r['basis']['sha256'][:16]}... (low-rank codes decode with it)"]
    if r["calibration"]:
        lines += ["", format_calibration(r["calibration"])]
    return "\n".join(lines)


def _pixel_note(mode: str, enc: dict) -> str:
    """How the cache stores pixels, for the size line."""
    if mode == "none":
        return " (--pixels none: training reads the images)"
    if mode == "jpeg" and enc:
        return (" (--pixels jpeg, quality {quality}, {subsampling}, decoded for the teacher by the {decoder} "
                "decoder)".format(**enc))
    if mode == "lossless" and enc:
        return " (--pixels lossless: exact, filter {filter}, {compressor[cname]} level {compressor[clevel]})".format(**enc)
    return ""


def format_calibration(record: dict) -> str:
    """The table extract prints: each candidate's bytes, held-out error (and a low-rank code's truncation: the
    part of it the student could learn, which the study finds is what costs), the chosen one marked."""
    held = record["heldout_views"]
    lines = [f"calibration: {record['views']} views of the teacher's targets ({record['fit_views']} fit the basis, "
             f"errors on {held if held else 'the same'} {'held-out ' if held else ''}views)"
             + (f", --max-error {record['max_error']:g}" if record["max_error"] is not None else ""),
             "  codec          target B/view   rel RMSE   worst view   truncation"]
    for name, e in sorted(record["errors"].items(), key=lambda kv: kv[1]["target_bytes_per_view"]):
        mark = "  <- chosen" if name == record["chosen"] else ""
        # low rank only: what the basis drops (a record written before this column has none)
        trunc = f"{100 * e['truncation_rel_rmse']:6.2f} %" if "truncation_rel_rmse" in e else "       -"
        lines.append(f"  {name:13s} {e['target_bytes_per_view']:>14,d}   {100 * e['rel_rmse']:6.2f} %   "
                     f"{100 * e['max_view_rel_rmse']:6.2f} %     {trunc}{mark}")
    return "\n".join(lines)


def _pct(d: dict | None, k: str) -> str:
    return f"{100 * d[k]:.3f} %" if d else "-"


def _f(d: dict | None, k: str) -> str:
    return f"{d[k]:.6f}" if d else "-"


def inspect_logits_report(path: str) -> dict:
    """Figures of a stage-2 logits cache (`g2sd-cache extract-logits`): teacher, plan, epochs, size; read from its
    manifest alone (no chunk is opened; `verify` checks them)."""
    from g2sd_cache.cache.logits import LogitsCache
    from g2sd_cache.cache.remote import is_remote
    if is_remote(str(path)):
        from g2sd_cache.cache.logits_remote import read_manifest
        m = read_manifest(str(path))[1]
    else:
        m = LogitsCache(path).manifest
    plan = m.plan
    return {"kind": "logits", "format": m.format, "format_version": m.format_version, "teacher": m.teacher,
            "teacher_precision": m.teacher_precision, "epochs": m.epochs, "groups_per_epoch": m.groups_per_epoch,
            "group_size": m.group_size, "topk": m.topk, "num_classes": m.num_classes, "shards": len(m.shards),
            "samples": m.samples, "bytes": m.bytes, "bytes_per_sample": m.bytes_per_sample,
            "seed": plan.get("seed"), "images": plan.get("num_images"), "recipe": plan.get("recipe")}


def format_logits_report(r: dict) -> str:
    t = r["teacher"]
    return "\n".join([
        f"logits cache   {r['format']} version {r['format_version']} (stage 2: `finetune --logits`)",
        f"teacher        {t.get('arch')}  ({t.get('source')}, sha256 {str(t.get('sha256'))[:16]}...), "
        f"{r['teacher_precision']}, {r['num_classes']} classes",
        f"predictions    top-{r['topk']} logits + argmax of {r['samples']} samples: {r['epochs']} epoch(s) x "
        f"{r['groups_per_epoch']} groups x {r['group_size']} in {r['shards']} shards",
        f"plan           seed {r['seed']}, {r['images']} images",
        f"size           {r['bytes'] / 2**20:.2f} MiB on disk, {r['bytes_per_sample']:.1f} B/sample",
    ])
