"""`g2sd-cache extract`: its flags (defaults from `ExtractConfig`) and the line it prints."""
from __future__ import annotations

from g2sd_cache.cli.command import Command
from g2sd_cache.common.config import config_from_args, set_dataclass_defaults
from g2sd_cache.generic.extract import ExtractConfig, run_extract

EXAMPLE = "g2sd-cache extract --data /data/imagenet/train --teacher mae_pretrain_vit_base_full.pth " \
          "--arch mae_vit_base_patch16 --out /cache/in1k-b16 --views 4"
# Given on the command line or in --config: no default would be a sensible cache.
REQUIRED = ("data", "out", "teacher")


def add(sub):
    from g2sd_cache.cache.codecs import CODECS
    from g2sd_cache.models.mae import TEACHER_PRESETS
    p = sub.add_parser("extract", help="run the MAE teacher once over sampled views and write the target cache",
                       description="Sample K views (crop, flip, mask) of every image, run the frozen MAE teacher and "
                                   "store LN-ed decoder features (and each view's visible patches) in a sharded zarr v3 "
                                   "cache. Rerunning the same command resumes: complete shards are kept, the rest "
                                   f"redone. Example: {EXAMPLE}")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="image folder (class sub-folders or flat; jpg/jpeg/png/webp) or webdataset tars: "
                      "paths, brace patterns like 'train-{000000..000099}.tar', URLs, comma-separated (required)")
    data.add_argument("--out", help="cache directory or fsspec URL (s3://bucket/prefix, gs://...) to create (or "
                      "resume); a URL gets each shard uploaded as it is finished, its shard.json last (required)")
    data.add_argument("--staging", help="--out is a URL: local folder where shards are written before their upload "
                      "(about two shards at a time; default: a folder in the system's temp directory)")
    data.add_argument("--lease-s", type=float, help="--out is a URL: seconds of the lock's lease on the store, renewed "
                      "while extract runs: how long a crashed extract on another host blocks the next (default "
                      "%(default)s)")
    data.add_argument("--pixels", choices=["visible", "lossless", "jpeg", "none"], help="visible (default %(default)s): "
                      "also store each view's visible patches as uint8 (+37,632 B/view at 224 px, mask 0.75), so train "
                      "needs no images and no decoder; lossless: the same patches exactly, filtered and compressed "
                      "(~19 KB/view on photographs; the host decompresses, the device undoes the filter); jpeg: as one JPEG per view (~4.3 KB at quality 90 on photographs), and "
                      "the teacher is given the decoded JPEG, so teacher and student still see the same pixels (train "
                      "decodes it: ~0.13 ms of CPU per view, or the GPU's decoder when extracted on a GPU); none: the "
                      "smallest cache, train then needs --data")
    data.add_argument("--pixel-quality", type=int, metavar="Q", help="--pixels jpeg: JPEG quality 1..100, chroma "
                      "not subsampled (default %(default)s)")
    data.add_argument("--on-error", choices=["skip", "fail"], help="unreadable images: skip and list them in the "
                      "manifest, or stop with the path (default %(default)s)")
    data.add_argument("--overwrite", action="store_true", help="replace the cache at --out: only a folder marked as a "
                      "g2sd-cache cache that holds nothing else is deleted; anything else is refused")
    data.add_argument("--config", help="YAML file of these options (names with underscores); flags override it")
    model = p.add_argument_group("teacher and views")
    model.add_argument("--teacher", help="official MAE checkpoint with its decoder "
                       "(mae_pretrain_vit_*_full.pth, G2SD's teacher, or mae_visualize_vit_*.pth), or 'random' / "
                       "'random:SEED' for a seeded random teacher, or 'pretrained-micro[:SEED]' (with --arch test_mae_micro_patch16: "
                       "pretrained with MAE's loss on scikit-image's photographs, once per machine) (required)")
    model.add_argument("--arch", choices=list(TEACHER_PRESETS), help="teacher architecture (default %(default)s)")
    model.add_argument("--target-layer", type=int, help="teacher decoder block whose LN-ed output is the target "
                       "(default %(default)s, G2SD's)")
    model.add_argument("--views", type=int, help="views per image; train uses view (epoch mod views) (default "
                       "%(default)s)")
    model.add_argument("--seed", type=int, help="seed of the view sampler (view = f(seed, image, view index)) and of "
                       "the images' order in the shards (default %(default)s)")
    model.add_argument("--mask-ratio", type=float, help="fraction of patches hidden (default %(default)s, MAE's)")
    model.add_argument("--img-size", type=int, help="crop size in pixels (default %(default)s)")
    model.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the teacher's "
                       "arithmetic (default %(default)s: fp16 autocast on CUDA, as G2SD's teacher runs; fp32 on CPU, "
                       "where fp16 is unsupported). Recorded in the manifest and shown by inspect; its error lands in "
                       "every stored target")
    store = p.add_argument_group("storage")
    store.add_argument("--codec", metavar="{" + ",".join(CODECS) + ",pcaR,pcaA+B+C,auto}",
                       help="how targets are stored: fp16/bf16 (2 B/value), int8/fp8 with a per-token scale "
                       "(1 B/value), int4 (0.5 B/value, a float16 scale per 32 channels, unbiased stochastic "
                       "rounding), pcaR (R int8 coefficients per token in a PCA basis fitted on the teacher's "
                       "targets, stored with the cache: pca64 is 66 B/token), pcaA+B+C (the same basis, A int8, "
                       "B 4-bit and C 2-bit coefficients, the last two unbiased: pca32+128+256 is 166 B/token and "
                       "keeps 416 directions), or auto: the fewest bytes within "
                       "--max-error; see `g2sd-cache inspect` for each codec's error on your teacher "
                       "(default %(default)s)")
    store.add_argument("--max-error", type=float, help="with --codec auto: the largest relative RMS error of decoded "
                       "targets, measured on held-out calibration views (e.g. 0.05)")
    store.add_argument("--calibration-views", type=int, help="views of the teacher's targets that --codec auto/pcaR "
                       "measure codecs and fit the basis on: the cache's first views (default %(default)s)")
    store.add_argument("--shard-size", type=int, help="views per cache shard for image folders (memory: about 2 "
                       "shards of targets); tar sources keep one shard per tar (default %(default)s)")
    store.add_argument("--chunk-views", type=int, help="images per inner zarr chunk (the unit of a read and of a "
                       "checksum) (default %(default)s)")
    perf = p.add_argument_group("performance")
    perf.add_argument("--batch-size", type=int, help="views per teacher forward (default %(default)s)")
    perf.add_argument("--workers", type=int, help="DataLoader processes decoding images (default min(8, CPUs): "
                      "%(default)s here)")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (auto: this rank's GPU if any)")
    perf.add_argument("--dist-timeout", type=float, help="minutes a collective (barrier, all-reduce) waits for the "
                      "other ranks before it fails instead of hanging (default %(default)s)")
    set_dataclass_defaults(p, ExtractConfig, required=REQUIRED)
    return p


def run(args) -> int:
    s = run_extract(config_from_args(ExtractConfig, args, required=REQUIRED))
    if "cache_views" in s:
        print(f"extracted {s['views']} views in {s['seconds']:.1f} s ({s['views_per_s']:.1f} views/s), "
              f"{s['skipped_images']} images skipped; cache: {s['cache_views']} views, "
              f"{s['cache_bytes'] / 2**20:.1f} MiB, {s['bytes_per_view']:.0f} B/view; "
              f"peak RSS {s['peak_rss_gb']:.2f} GiB" + (f", GPU {s['peak_gpu_gb']:.2f} GiB" if 'peak_gpu_gb' in s else ""))
    return 0


COMMAND = Command("extract", add, run, config=ExtractConfig)
