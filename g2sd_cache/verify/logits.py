"""`g2sd-cache verify LOGITS`: check a logits cache (cache/logits.py) without trusting it.

`g2sd-cache verify` hands a folder whose manifest or config says it is a logits cache to `verify_logits`;
the target cache's checks stay in verify/cache.py. One problem line each ("shard-00003: what is wrong"):
- the manifest parses; `config.yaml` names the same teacher and plan; no temporary (`.tmp-`) files;
- the shard folders on disk are exactly the manifest's; each `shard.json` agrees with its manifest entry and
  lists exactly the files on disk, at their sizes; the shards tile the epoch's groups in order; the sample and
  byte counts add up (K epochs x groups x group size);
- every array has the shape and dtype of the format ([K, n, k] values fp16, indices, [K, n] argmax) and
  every shard index's and inner chunk's crc32c holds (a missing chunk is a problem, never fill values);
- every stored value is finite, the top-k values descend, and every index and argmax is a class of the plan;
- with `--data` (the training folder): the plan rebuilt from the manifest's seed and recipe on that folder is
  the cache's (listing, classes, library versions); with `--deep N` also: N random groups rebuilt and run
  through the live teacher (fp32), whose argmax must equal the stored one for every sample and whose top-k
  logits must equal the stored fp16 values within fp16 rounding.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from g2sd_cache.models.classifier import build_teacher
from g2sd_cache.common.dist import resolve_device
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.cache.logits import LogitsCache, LogitsShardRecord, logits_specs
from g2sd_cache.cache.logits_checks import layout_problems
from g2sd_cache.cache.schema import SHARD_RECORD, TMP_MARK
from g2sd_cache.specific.augment import AugmentRecipe
from g2sd_cache.specific.mix import MixRecipe
from g2sd_cache.specific.plan import SDPlan, SDRecipe, check_same_plan
from g2sd_cache.training.precision import replay_precision
from g2sd_cache.verify.files import VerifyReport
from g2sd_cache.cache.zarr_layout import parse_layout

FP16_REL = 2.0 ** -10   # fp16 keeps 10 mantissa bits: |stored - live| <= |live| * 2^-11, with margin


def recipe_from_description(recipe: dict) -> SDRecipe:
    """The SDRecipe recorded by SDPlan.describe() (JSON: tuples came back as lists)."""
    augment = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["augment"].items()}
    return SDRecipe(augment=AugmentRecipe(**augment), mix=MixRecipe(**recipe["mix"]), group_size=recipe["group_size"])


def verify_logits(path: str, deep: int = 0, teacher: str | None = None, data: str | None = None,
                  device: str = "auto", seed: int = 0, teacher_precision: str | None = None) -> VerifyReport:
    """Check the logits cache at `path`; see the module docstring. Raises UserError when it cannot be read
    at all (no manifest); everything else becomes a problem line of the report."""
    t0 = time.perf_counter()
    cache = LogitsCache(path)
    m = cache.manifest
    report = VerifyReport(str(path))
    root = Path(path)
    _check_layout(report, root, m)
    checked = _check_shards(report, cache)
    report.summary.update(checked, epochs=m.epochs, groups=m.groups_per_epoch, group_size=m.group_size, topk=m.topk,
                          num_classes=m.num_classes, samples=m.samples, bytes=m.bytes,
                          bytes_per_sample=m.bytes_per_sample, teacher=m.teacher.get("source"),
                          teacher_precision=m.teacher_precision)
    if data is not None:
        _check_plan(report, cache, data, deep, teacher, device, seed, teacher_precision)
    elif deep:
        raise UserError("--deep needs --data: the training image folder the logits cache was extracted from")
    report.summary["seconds"] = time.perf_counter() - t0
    return report


def verify_logits_at(path: str, **kw) -> VerifyReport:
    """`verify_logits` of a folder or an fsspec URL. A URL's objects are copied as they are into a temporary folder
    first (a logits cache is small: cache/logits_remote.py), so the store's leftovers, foreign objects and damage
    are reported as on a disk; the report names the URL."""
    from g2sd_cache.cache.remote import is_remote
    if not is_remote(str(path)):
        return verify_logits(path, **kw)
    import tempfile
    from g2sd_cache.cache.logits_remote import read_manifest, verbatim_copy
    read_manifest(str(path))      # not a logits cache, or an unfinished one: its one line, before any download
    with tempfile.TemporaryDirectory(prefix="g2sd-verify-") as tmp:
        report = verify_logits(str(verbatim_copy(str(path), Path(tmp))), **kw)
    report.path = str(path)
    return report


def _check_layout(report: VerifyReport, root: Path, m) -> None:
    for where, what in layout_problems(root, m):
        report.add(where, what)


def _check_shards(report: VerifyReport, cache: LogitsCache) -> dict:
    m, root = cache.manifest, cache.root
    specs = logits_specs(m.topk, m.num_classes)
    files = chunks = 0
    for s, entry in enumerate(m.shards):
        name = entry["name"]
        base = root / name
        if not base.is_dir():
            continue
        try:
            record = LogitsShardRecord.from_json((base / SHARD_RECORD).read_text())
        except (OSError, ValueError, TypeError) as e:
            report.add(name, f"{SHARD_RECORD} cannot be read ({type(e).__name__}: {e})")
            continue
        if (record.first_group, record.groups, record.group_size, record.epochs, record.files) != \
                (entry["first_group"], entry["groups"], m.group_size, m.epochs, entry["files"]):
            report.add(name, f"{SHARD_RECORD} disagrees with manifest.json")
        disk = {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and p.name != SHARD_RECORD and TMP_MARK not in p.name}
        for rel in sorted(set(disk) ^ set(entry["files"])):
            report.add(name, f"file {rel} is {'not listed in the manifest' if rel in disk else 'missing'}")
        for rel in sorted(set(disk) & set(entry["files"])):
            if disk[rel] != entry["files"][rel]:
                report.add(name, f"file {rel} has {disk[rel]} bytes, the manifest says {entry['files'][rel]}")
        try:
            cache.check_shard(s)     # the record's digest in the manifest, every file's digest in the record
        except CacheCorruptError as e:
            report.add(name, str(e).split(" is corrupt: ")[-1].split(";")[0])
            continue
        n = entry["groups"] * m.group_size
        for array, spec in specs.items():
            try:
                layout = parse_layout(json.loads((base / array / "zarr.json").read_text()))
            except (OSError, ValueError, KeyError) as e:
                report.add(name, f"{array}/zarr.json: {type(e).__name__}: {e}")
                continue
            want = (m.epochs, n, *spec.per_view_shape)
            if layout.shape != want or layout.dtype != spec.dtype:
                report.add(name, f"{array} is {layout.dtype} {list(layout.shape)}, expected {spec.dtype} {list(want)}")
                continue
            for epoch in range(m.epochs):
                try:
                    rows = np.array(cache.shard_file(s, epoch, array).rows(0, n))
                except CacheCorruptError as e:
                    report.add(name, f"{array}, epoch {epoch}: {str(e).split(' is corrupt: ')[-1].split(';')[0]}")
                    continue
                files += 1
                chunks += math.prod(layout.chunks_per_shard)
                _check_values(report, name, array, epoch, rows, m.num_classes)
    return {"files": files, "chunks": chunks}


def _check_values(report: VerifyReport, shard: str, array: str, epoch: int, rows: np.ndarray, classes: int) -> None:
    where = f"{array}, epoch {epoch}"
    if array == "values":
        values = rows.astype(np.float32)
        if not np.isfinite(values).all():
            report.add(shard, f"{where}: non-finite logits")
        elif rows.shape[-1] > 1 and (np.diff(values, axis=-1) > 0).any():
            report.add(shard, f"{where}: top-k values do not descend")
    elif (rows.astype(np.int64) >= classes).any() or (rows.astype(np.int64) < 0).any():
        report.add(shard, f"{where}: a class index outside 0..{classes - 1}")


def _check_images(report: VerifyReport, cache: LogitsCache, plan: SDPlan) -> None:
    """Every image the cache's groups read is still the same bytes (crc32c in the shard records)."""
    from g2sd_cache.cache.digests import image_crc32c
    source = plan.data.source
    try:
        recorded = cache.image_crc32c(len(plan.data))
    except CacheCorruptError as e:
        report.add("data", str(e))
        return
    changed = [source.keys[i] for i in np.flatnonzero(recorded >= 0)
               if image_crc32c(source.read(source.keys[i])) != recorded[i]]
    for key in changed[:5]:
        report.add("data", f"image {key} changed since extract-logits read it (crc32c differs): its cached "
                           f"predictions no longer describe it")
    if len(changed) > 5:
        report.add("data", f"... and {len(changed) - 5} more changed images")
    report.summary["images_checked"] = int((recorded >= 0).sum())


def _check_plan(report: VerifyReport, cache: LogitsCache, data: str, deep: int, teacher_spec: str | None,
                device: str, seed: int, teacher_precision: str | None = None) -> None:
    from g2sd_cache.specific.extract_logits import teacher_predictions
    from g2sd_cache.specific.plan import open_plan
    m = cache.manifest
    plan: SDPlan = open_plan(data, recipe_from_description(m.plan["recipe"]), m.plan["seed"])
    try:
        check_same_plan(m.plan, plan.describe(), f"logits cache {cache.root}")
    except UserError as e:
        report.add("plan", str(e))
        return
    report.summary["plan"] = True
    _check_images(report, cache, plan)
    if not deep:
        return
    spec = teacher_spec or m.teacher["source"]
    teacher, info = build_teacher(spec, m.teacher["arch"], m.num_classes, m.plan["recipe"]["augment"]["img_size"])
    if info.sha256 != m.teacher["sha256"]:
        raise UserError(f"--teacher {spec} is not the teacher that made the cache (sha256 {m.teacher['sha256'][:12]}...)")
    dev = resolve_device(device)
    teacher.to(dev)
    precision = replay_precision(teacher_precision, m.teacher_precision, dev, auto="fp32")
    rng = np.random.default_rng(seed)
    picks = rng.choice(m.epochs * m.groups_per_epoch, size=min(deep, m.epochs * m.groups_per_epoch), replace=False)
    disagree = compared = 0
    worst = 0.0
    for pick in sorted(int(p) for p in picks):
        epoch, group = divmod(pick, m.groups_per_epoch)
        batch = plan.batch(epoch, group)
        logits, _, _, argmax = teacher_predictions(teacher, batch.images.to(dev), m.topk, precision)
        stored = cache.read(epoch, group)
        live = logits.cpu().gather(1, stored.indices)
        bad = (argmax.cpu() != stored.argmax).sum().item()
        err = ((live - stored.values).abs() / live.abs().clamp_min(1e-3)).max().item()
        worst = max(worst, err)
        compared += len(stored.argmax)
        disagree += bad
        if bad:
            report.add("deep", f"epoch {epoch} group {group}: {bad} of {len(stored.argmax)} stored argmax differ from "
                               f"the live teacher")
        if err > FP16_REL:
            report.add("deep", f"epoch {epoch} group {group}: stored top-k logits differ from the live teacher by a "
                               f"relative {err:.2e} (> {FP16_REL:.1e}, fp16 rounding)")
    report.summary["deep"] = {"groups": len(picks), "samples": compared, "agreement": 1 - disagree / max(1, compared),
                              "worst_rel_err": worst, "device": str(dev), "precision": precision,
                              "extract_precision": m.teacher_precision}


def format_logits_summary(report: VerifyReport) -> str:
    s = report.summary
    lines = [f"logits cache {report.path}",
             f"content  {s['samples']} samples = {s['epochs']} epoch(s) x {s['groups']} groups x {s['group_size']}, "
             f"top-{s['topk']} of {s['num_classes']} classes, {s['bytes_per_sample']:.1f} B/sample on disk",
             f"teacher  {s['teacher']} (ran in {s['teacher_precision']})",
             f"checked  {s['files']} shard files, {s['chunks']} inner chunks: crc32c of every chunk and index; "
             f"values finite and descending, classes in range"]
    if s.get("plan"):
        lines.append("plan     the data folder, seed and recipe rebuild the cache's plan")
    if "deep" in s:
        d = s["deep"]
        lines.append(f"deep     {d['groups']} groups ({d['samples']} samples) through the live teacher on {d['device']}: "
                     f"argmax agreement {100 * d['agreement']:.2f}%, worst top-k relative error {d['worst_rel_err']:.1e}")
    lines.append(f"time     {s.get('seconds', 0.0):.2f} s")
    lines.append("OK: the logits cache is sound" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)
