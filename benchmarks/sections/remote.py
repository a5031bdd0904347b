"""The data section's `remote` part: training reads from a cache on an object store through the node-local
copy (cache/local_mirror.py), against a local S3 server (moto, a subprocess on 127.0.0.1, so its CPU is not
ours). Needs `pip install "g2sd-cache[test]"` (moto, s3fs); skipped with a note otherwise.

    python -m g2sd_cache.benchmarks.sections.remote [--quick]     # alone, on its own small cache

- `cold_samples_per_s`: one epoch with an empty local copy (downloads on background threads, each file's
  digest and crc32c checked on arrival), per CPU-second of this process; `cold_wall_samples_per_s` by the
  clock (waits on downloads included).
- `warm_samples_per_s`: the same epoch again, every file local: the pixel path as on a local disk.
- `first_batch_s`: from the epoch's loader to its first step, cold (the first files' round trips).
- `fetched_per_epoch_share`: bytes fetched in the cold epoch / the epoch's share of the cache (its view's
  files): 1.0 = each byte once.
- `download_cpu_s_per_gb`: CPU-seconds of the cold epoch beyond the warm one, per GB fetched: what the
  downloads and their checks cost this process.
- `small_limit`: one cold epoch with --local-cache-limit at 3/8 of the epoch's share, with --shuffle-span at what
  train advises for that limit (generic/plan.py: ~limit / 3 views) and with the whole-epoch shuffle: bytes fetched
  / the epoch's share for each (1.0 = each byte once). Needs a cache of several shards whose shards hold several
  inner chunks (`main` extracts one).
A local server has ~0.1 ms round trips and memory bandwidth; a real store has 10-50 ms first-byte latency
and 50-200 MB/s per connection, so cold rates there depend on --download-threads x per-connection rate, and
time to first batch on the latency. See the README ("Caches on an object store").
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from g2sd_cache.benchmarks.common import cpu_clock, log, torch_threads


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """`moto_server` on 127.0.0.1 in a subprocess; fsspec's s3 filesystems in this process talk to it."""

    def __enter__(self) -> "LocalS3":
        import fsspec.config
        import s3fs

        port = _port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.saved = (dict(os.environ), fsspec.config.conf.get("s3"))
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": self.endpoint})
        fsspec.config.conf["s3"] = {"endpoint_url": self.endpoint}
        s3fs.S3FileSystem.clear_instance_cache()
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        import fsspec.config
        import s3fs

        self.proc.terminate()
        self.proc.wait(timeout=30)
        env, conf = self.saved
        os.environ.clear()
        os.environ.update(env)
        if conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = conf
        s3fs.S3FileSystem.clear_instance_cache()


def remote_part(cache: Path, cached_run, tmp: Path) -> dict:
    """Figures for `cache` (a local cache folder) served from a local S3 server; `cached_run`: the data
    section's cached `Run` (its TrainConfig and env)."""
    import importlib.util

    if not (importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs")):
        return {"skipped": "needs moto and s3fs: pip install 'g2sd-cache[test]'"}
    import fsspec

    from g2sd_cache.benchmarks.sections.step import Run

    with LocalS3(), torch_threads(1):
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        url = "s3://bench/cache"
        with cpu_clock() as up:
            fs.put(str(cache), url, recursive=True)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        local = tmp / "local-copy"
        shutil.rmtree(local, ignore_errors=True)
        run = Run.build(dataclasses.replace(cached_run.cfg, cache=url, local_cache=str(local)), cached_run.env)
        mirror = run.setup.cache.mirror

        def epoch_pass() -> dict:
            t0 = time.perf_counter()
            loader = run.loader(0, workers=0)
            first, n = None, 0
            with cpu_clock() as got:
                for step in loader:
                    first = first if first is not None else time.perf_counter() - t0
                    n += sum(len(b) for b in step)
            return {"samples": n, "first_batch_s": first, **got}

        log("data/remote: one epoch from a local S3 server, cold then warm local copy")
        before = mirror.fetched_bytes
        cold = epoch_pass()
        fetched = mirror.fetched_bytes - before
        warm = [epoch_pass() for _ in range(2)][-1]
        cache_obj = run.setup.cache
        share = sum(f.size for s in range(len(cache_obj.manifest.shards)) for f in cache_obj.view_files(s, 0))
        extra_cpu = max(0.0, cold["cpu_s"] - warm["cpu_s"])
        cache_obj.close()
        small = _small_limit(cached_run, url, share, tmp)
        return {
            "endpoint": "moto_server on 127.0.0.1 (subprocess)", "cache_bytes": size,
            "upload_mb_per_s": size / 1e6 / up["wall_s"],
            "cold_samples_per_s": cold["samples"] / cold["cpu_s"], "cold_wall_samples_per_s": cold["samples"] / cold["wall_s"],
            "warm_samples_per_s": warm["samples"] / warm["cpu_s"], "warm_wall_samples_per_s": warm["samples"] / warm["wall_s"],
            "first_batch_s": {"cold": cold["first_batch_s"], "warm": warm["first_batch_s"]},
            "epoch_samples": cold["samples"], "fetched_bytes": fetched, "epoch_share_bytes": share,
            "fetched_per_epoch_share": fetched / max(1, share),
            "download_cpu_s_per_gb": extra_cpu / max(1e-9, fetched / 1e9),
            "download_threads": run.cfg.download_threads, "prefetch_files": run.cfg.prefetch_files,
            "small_limit": small,
        }


def _small_limit(cached_run, url: str, share: int, tmp: Path) -> dict:
    """Cold epochs under a local-copy limit of 3/8 of the epoch's share: spans against the whole-epoch shuffle."""
    from g2sd_cache.benchmarks.sections.step import Run

    cache = cached_run.setup.cache
    if len(cache.manifest.shards) < 4:
        return {"skipped": f"the cache has {len(cache.manifest.shards)} shard(s); a limit below the epoch needs several"}
    limit = share * 3 // 8
    span = max(1, int(limit / 3 / (share / sum(cache.shard_images))))     # train's advice (generic/step.py)
    out = {"limit_bytes": limit, "limit_per_epoch_share": limit / share, "shuffle_span": span, "shards": len(cache.shard_images)}
    for name, s in (("span", span), ("whole_epoch", 0)):
        folder = tmp / f"limited-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        run = Run.build(dataclasses.replace(cached_run.cfg, cache=url, local_cache=str(folder),
                                            local_cache_limit=str(limit), shuffle_span=s), cached_run.env)
        mirror = run.setup.cache.mirror
        before = mirror.fetched_bytes
        log(f"data/remote: one cold epoch, local copy limited to {limit / 2**20:.1f} MiB, --shuffle-span {s}")
        t0 = time.perf_counter()
        for _ in run.loader(0, workers=0):
            pass
        out[f"fetched_per_epoch_share_{name}"] = (mirror.fetched_bytes - before) / max(1, share)
        out[f"wall_s_{name}"] = time.perf_counter() - t0
        run.setup.cache.close()
    return out


def main(argv=None) -> int:
    import argparse
    import json
    import tempfile

    import torch

    from g2sd_cache.benchmarks.common import make_images, profile_for
    from g2sd_cache.benchmarks.sections.extract import extract_config, timed_extract
    from g2sd_cache.benchmarks.sections.step import Run
    from g2sd_cache.common.dist import init_distributed
    from g2sd_cache.generic.step import TrainConfig

    ap = argparse.ArgumentParser(description="the data section's remote part alone")
    ap.add_argument("--quick", action="store_true", help="micro presets")
    ap.add_argument("--images", type=int, help="images in the cache (default: the profile's)")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    prof = profile_for(device, args.quick)
    with tempfile.TemporaryDirectory(prefix="g2sd-remote-bench-") as t:
        tmp = Path(t)
        images = make_images(tmp / "images", args.images or prof.store_images)
        # shards of 32 images in inner chunks of 8 views: several shards of several blocks, as a real cache has
        # (the small-limit pass needs them; ImageNet's default is 512 images x 4 views per shard, 64-view chunks)
        timed_extract(extract_config(images, tmp / "cache", prof.teachers[0], prof, device, workers=0,
                                     shard_size=32 * prof.views, chunk_views=8))
        env = init_distributed("cpu")
        base = TrainConfig(out=str(tmp / "run"), cache=str(tmp / "cache"), student=prof.students[0],
                           batch_size=prof.batch, workers=0, seed=0, device="cpu")
        rep = remote_part(tmp / "cache", Run.build(base, env), tmp)
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
