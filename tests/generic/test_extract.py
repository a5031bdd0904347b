"""`g2sd-cache extract`: cached targets equal the live teacher, coverage, resume after kill -9, bad input,
torchrun, tar sources, DataLoader workers, inspect and the CLI's one-line errors.

All runs use the micro teacher at 64 px (L = 16, T = 17, D = 32) so an extraction takes well under a second.
"""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tests.common.helpers import MICRO_TEACHER, micro_extract_config

from g2sd_cache import open_cache
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import build_teacher
from g2sd_cache.cache.schema import LOCK_FILE, MANIFEST, folder_order, source_index_for_tar
from g2sd_cache.data.synthetic import jpeg_bytes, make_tar_shards, synthetic_image
from g2sd_cache.data.views import ViewGeometry, decode_image, normalize, render_view, sample_view, visible_patches

# relative RMS error of a cached view against the live teacher, per codec (see tests/cache/test_codecs.py)
BOUNDS = {"fp16": 1e-3, "bf16": 5e-3, "int8": 0.01, "fp8": 0.03}
REPO = Path(__file__).resolve().parents[2]



def _env():
    """Subprocess environment: one thread each (the test machine is small and shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _cli_args(data, out, **kw):
    """CLI arguments equal to conftest.micro_extract_config(data, out, **kw)."""
    cfg = micro_extract_config(data, out, **kw)
    args = ["extract", "--data", cfg.data, "--out", cfg.out, "--teacher", cfg.teacher, "--arch", cfg.arch,
            "--img-size", str(cfg.img_size), "--views", str(cfg.views), "--shard-size", str(cfg.shard_size),
            "--chunk-views", str(cfg.chunk_views), "--batch-size", str(cfg.batch_size), "--workers",
            str(cfg.workers), "--device", cfg.device, "--codec", cfg.codec, "--seed", str(cfg.seed),
            "--on-error", cfg.on_error]
    return args + (["--overwrite"] if cfg.overwrite else [])


def _arrays(cache_dir) -> dict:
    """{(shard name, array name): numpy array} of every shard the manifest lists."""
    m = json.loads((Path(cache_dir) / MANIFEST).read_text())
    out = {}
    for s in m["shards"]:
        with warnings.catch_warnings():  # zarr notes that shard.json is not a zarr node
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(Path(cache_dir) / s["name"]), mode="r")
            for name, arr in group.arrays():
                out[(s["name"], name)] = arr[...]
    return out


def _assert_same_cache(a, b):
    ma, mb = (json.loads((Path(p) / MANIFEST).read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"]
    for k in ("views", "images", "skipped", "teacher", "codec", "tokens", "target_dim", "source", "codec_error"):
        assert ma[k] == mb[k], k
    xa, xb = _arrays(a), _arrays(b)
    assert sorted(xa) == sorted(xb)
    for key in xa:
        assert xa[key].dtype == xb[key].dtype and xa[key].shape == xb[key].shape, key
        assert np.array_equal(xa[key], xb[key]), key
    for s in ma["shards"]:  # the shard records too
        assert (Path(a) / s["name"] / "shard.json").read_text() == (Path(b) / s["name"] / "shard.json").read_text()


def _write_images(root: Path, n: int, seed: int = 0, sizes=((80, 160), (60, 120))) -> Path:
    """n small JPEGs of varied sizes in 3 class folders (fast to make and to decode)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(*sizes[0])), int(rng.integers(*sizes[1])))
        (d / f"img{i:05d}.jpg").write_bytes(jpeg_bytes(synthetic_image(seed * 1000 + i, size)))
    return root


def _geometry(cache) -> ViewGeometry:
    return cache.manifest.geometry


def _replay(cache, image, rec, teacher) -> torch.Tensor:
    """The live teacher's target for a cached view, from the image and the cache's crop/flip/mask."""
    pixels = render_view(image, rec.crop, rec.flip, cache.manifest.geometry.img_size)
    return teacher.targets(normalize(pixels[None]), rec.mask[None], cache.manifest.target_layer)[0]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("random", MICRO_TEACHER, 64)[0]


@pytest.fixture(scope="module")
def codec_caches(image_folder, micro_cache, tmp_path_factory):
    """{codec: cache dir} of the session image folder, one per codec (fp16 is conftest's micro_cache)."""
    caches = {"fp16": micro_cache}
    for codec in ("bf16", "int8", "fp8"):
        out = tmp_path_factory.mktemp(f"cache-{codec}") / "c"
        run_extract(micro_extract_config(image_folder, out, codec=codec))
        caches[codec] = out
    return caches


# ----------------------------------------------------------------------------------------------
# content

@pytest.mark.parametrize("codec", list(BOUNDS))
def test_cached_targets_equal_a_direct_teacher_forward(codec, codec_caches, image_folder, teacher):
    cache = open_cache(codec_caches[codec])
    m = cache.manifest
    assert m.codec == codec and m.teacher.source == "random:0" and m.target_layer == 4
    assert (m.tokens, m.target_dim) == (17, 32)
    geometry = _geometry(cache)
    keys = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.jpg"))
    errors = []
    for i in range(len(cache)):
        rec = cache[i]
        assert keys[rec.source_index] == rec.key
        image = decode_image(str(image_folder / rec.key))
        # the stored view is the sampler's view (seed, image index, view index) of this image
        v = sample_view(m.seed, rec.source_index, rec.view, image.size, geometry)
        assert rec.crop == v.crop and rec.flip == v.flip
        assert np.array_equal(rec.mask.numpy(), v.mask)
        direct = _replay(cache, image, rec, teacher)
        errors.append(_rel(rec.target, direct))
        assert errors[-1] < BOUNDS[codec], (i, errors[-1])
    # not vacuous: a cached target is far from another view's live target
    other = _replay(cache, decode_image(str(image_folder / cache[1].key)), cache[1], teacher)
    assert _rel(cache[0].target, other) > 0.3
    # the manifest's codec errors, measured at extraction against fp32, are consistent with ours
    assert m.codec_error[codec]["rel_rmse"] < BOUNDS[codec]
    assert float(np.mean(errors)) < 2 * m.codec_error[codec]["rel_rmse"] + 1e-6


def test_stored_pixels_are_the_visible_patches_of_the_regenerated_view(micro_cache, image_folder, tmp_path):
    """What a cache stores as pixels is byte for byte what the teacher saw: the regenerated view's visible
    patches (crop and flip applied, ascending patch order, HWC), for every view, flipped or not."""
    cache = open_cache(micro_cache)
    geometry = _geometry(cache)
    assert cache.has_pixels and cache.manifest.pixels == "visible"
    flips = set()
    for i in range(len(cache)):
        rec = cache[i]
        image = decode_image(str(image_folder / rec.key))
        v = sample_view(cache.manifest.seed, rec.source_index, rec.view, image.size, geometry)
        rendered = render_view(image, v.crop, v.flip, geometry.img_size)
        want = visible_patches(rendered[None], torch.from_numpy(v.mask)[None], geometry.patch_size)[0]
        assert rec.pixels.dtype == torch.uint8 and rec.pixels.shape == (geometry.num_visible, 16, 16, 3)
        assert torch.equal(rec.pixels, want), i
        flips.add(rec.flip)
    assert flips == {True, False}
    # the block API returns them as one array, in row order
    b = cache.read_block(0, 1, 1, 3)
    assert b.pixels.shape == (2, geometry.num_visible, 16, 16, 3)
    assert np.array_equal(b.pixels[1], cache[cache.manifest.shards[0].images + 2].pixels.numpy())
    # --pixels none: today's smaller cache, the same views and targets, no pixels
    none = tmp_path / "none"
    run_extract(micro_extract_config(image_folder, none, pixels="none"))
    small = open_cache(none)
    assert not small.has_pixels and small.manifest.pixels == "none" and small[0].pixels is None
    assert small[5].crop == cache[5].crop and torch.equal(small[5].target, cache[5].target)
    assert not any(f.startswith("pixels/") for s in small.manifest.shards for f in s.files)


def test_every_image_and_view_exactly_once(codec_caches, image_folder):
    keys = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.jpg"))
    assert len(keys) == 12
    for codec, path in codec_caches.items():
        cache = open_cache(path)
        m = cache.manifest
        assert len(cache) == m.views == 24 and m.images == 12 and m.views_per_image == 2
        assert [s.images for s in m.shards] == [4, 4, 4] and all(s.complete for s in m.shards)
        assert m.source.kind == "folder" and m.source.count == 12 and m.skipped == []
        seen = [(cache[i].key, cache[i].view) for i in range(len(cache))]
        assert sorted(seen) == sorted((k, v) for k in keys for v in range(2)), codec
        # on-disk order: shard by shard, view-major inside a shard, images in the seeded order of the listing
        order = folder_order(m.seed, 12)
        expect = [(keys[order[s * 4 + r]], v) for s in range(3) for v in range(2) for r in range(4)]
        assert seen == expect
        assert [(s.start, s.stop, s.tar) for s in m.shards] == [(a, a + 4, None) for a in (0, 4, 8)]
        for name in ("torch", "torchvision", "pillow"):
            assert m.versions[name]


def test_codecs_store_the_same_views(codec_caches):
    """Every codec's cache holds the same views (crop, flip, mask) and targets agreeing within the codecs."""
    caches = {c: open_cache(p) for c, p in codec_caches.items()}
    for i in range(0, 24, 5):
        ref = caches["fp16"][i]
        for codec, cache in caches.items():
            r = cache[i]
            assert (r.key, r.view, r.crop, r.flip) == (ref.key, ref.view, ref.crop, ref.flip)
            assert torch.equal(r.mask, ref.mask)
            assert _rel(r.target, ref.target) < BOUNDS[codec] + BOUNDS["fp16"]


# ----------------------------------------------------------------------------------------------
# resume

def test_rerun_of_a_finished_cache_changes_nothing(image_folder, tmp_path):
    out = tmp_path / "c"
    cfg = micro_extract_config(image_folder, out)
    run_extract(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    arrays = _arrays(out)
    summary = run_extract(cfg)
    assert summary["views"] == 0 and summary["cache_views"] == 24
    # the lock file records each run's pid and host; everything else is left alone
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*")
             if p.is_file() and p.name not in (MANIFEST, "config.yaml", LOCK_FILE)}
    assert all(before[p] == t for p, t in after.items())
    again = _arrays(out)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)

    # a deleted shard (and manifest) is redone, identical; the other shards are left alone
    import shutil
    shutil.rmtree(out / "shard-00001")
    (out / MANIFEST).unlink()
    with pytest.raises(UserError, match="incomplete"):
        open_cache(out)
    summary = run_extract(cfg)
    assert summary["views"] == 8
    for p in (out / "shard-00000").rglob("*"):
        if p.is_file():
            assert p.stat().st_mtime_ns == before[p]
    again = _arrays(out)
    assert sorted(again) == sorted(arrays) and all(np.array_equal(arrays[k], again[k]) for k in arrays)


@pytest.mark.slow
def test_kill_9_during_extract_then_rerun_equals_an_uninterrupted_run(tmp_path, capsys):
    data = _write_images(tmp_path / "imgs", 240, seed=3)
    kw = dict(views=1, shard_size=8, chunk_views=4, batch_size=4)
    clean = tmp_path / "clean"
    run_extract(micro_extract_config(data, clean, **kw))

    out = tmp_path / "killed"
    args = _cli_args(data, out, **kw)
    proc = subprocess.Popen([sys.executable, "-m", "g2sd_cache.cli.main", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.glob("shard-*"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists(), "extract finished before the kill; the test needs a longer run"
    done = sorted(p.name for p in out.glob("shard-*"))
    assert 1 <= len(done) < 30
    with pytest.raises(UserError, match="incomplete"):
        open_cache(out)
    kept = {name: (out / name / "shard.json").stat().st_mtime_ns for name in done}

    # the same command again (in-process, through the CLI's own parsing)
    capsys.readouterr()
    assert cli_main(args) == 0
    summary = capsys.readouterr().out
    assert "resuming:" in summary and "views/s" in summary and "B/view" in summary and "cache: 240 views" in summary
    # complete shards were kept, not redone
    assert all((out / name / "shard.json").stat().st_mtime_ns == t for name, t in kept.items())
    assert not list(out.glob(".shard-*")), "temporary shard folders left behind"
    _assert_same_cache(out, clean)
    assert len(open_cache(out)) == 240


# ----------------------------------------------------------------------------------------------
# bad input

@pytest.fixture(scope="module")
def folder_with_bad_images(tmp_path_factory) -> Path:
    """00, 01 good, 02 truncated, 03 zero bytes, 04 good, 05 text, 06 good. With --seed 2 extract deals them
    [01 03 | 02 05 | 06 04 | 00] to shards of 2 (see `folder_order`): one all-bad shard."""
    root = tmp_path_factory.mktemp("bad")
    good = [jpeg_bytes(synthetic_image(i, (90 + 7 * i, 70 + 3 * i))) for i in range(5)]
    (root / "00.jpg").write_bytes(good[0])
    (root / "01.jpg").write_bytes(good[1])
    (root / "02_truncated.jpg").write_bytes(good[2][: len(good[2]) // 2])
    (root / "03_empty.jpg").write_bytes(b"")
    (root / "04.jpg").write_bytes(good[3])
    (root / "05_text.jpg").write_text("this is not an image\n")
    (root / "06.jpg").write_bytes(good[4])
    return root


def test_corrupt_images_are_skipped_and_listed(folder_with_bad_images, tmp_path, teacher):
    out = tmp_path / "c"
    summary = run_extract(micro_extract_config(folder_with_bad_images, out, views=1, shard_size=2, chunk_views=2,
                                               seed=2))
    assert summary["skipped_images"] == 3 and summary["cache_skipped"] == 3
    cache = open_cache(out)
    m = cache.manifest
    assert sorted(s["key"] for s in m.skipped) == ["02_truncated.jpg", "03_empty.jpg", "05_text.jpg"]
    assert all(s["error"] and "\n" not in s["error"] for s in m.skipped)
    assert m.images == 4 and m.views == 4 == len(cache)
    assert m.source.count == 7
    assert folder_order(2, 7).tolist() == [1, 3, 2, 5, 6, 4, 0]
    assert [s.images for s in m.shards] == [1, 0, 2, 1]  # the all-bad shard is complete and empty
    recs = [cache[i] for i in range(len(cache))]
    assert [r.key for r in recs] == ["01.jpg", "06.jpg", "04.jpg", "00.jpg"]
    assert [r.source_index for r in recs] == [1, 6, 4, 0]  # indices of the sorted listing, not renumbered
    for r in recs:
        direct = _replay(cache, decode_image(str(folder_with_bad_images / r.key)), r, teacher)
        assert _rel(r.target, direct) < BOUNDS["fp16"]
    assert sum(len(b) for b in cache.iter_blocks()) == 4


def test_corrupt_image_under_on_error_fail_stops_naming_it(folder_with_bad_images, tmp_path, capsys):
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(folder_with_bad_images, out, views=1, on_error="fail", seed=2))
    msg = str(e.value)
    assert "03_empty.jpg" in msg and "\n" not in msg and "--on-error skip" in msg  # the first bad one dealt
    assert not (out / MANIFEST).exists()
    # through the CLI: exit 2, one line on stderr, no traceback
    code = cli_main(_cli_args(folder_with_bad_images, tmp_path / "c2", views=1, on_error="fail", seed=2))
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.strip() and not line.startswith("extract")]  # drop tqdm's bar
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("g2sd-cache extract: error:") and "03_empty.jpg" in err[0]


def test_existing_cache_with_another_configuration_is_refused(image_folder, tmp_path):
    out = tmp_path / "c"
    base = dict(views=1)
    run_extract(micro_extract_config(image_folder, out, **base))
    arrays = _arrays(out)
    for change, needle in [({"seed": 1}, "seed"), ({"codec": "int8"}, "codec"), ({"teacher": "random:1"}, "teacher"),
                           ({"views": 2}, "views"), ({"target_layer": 2}, "target_layer"),
                           ({"mask_ratio": 0.5}, "mask_ratio")]:
        with pytest.raises(UserError, match=needle) as e:
            run_extract(micro_extract_config(image_folder, out, **{**base, **change}))
        assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    # nothing was touched
    again = _arrays(out)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    # overwrite replaces it
    run_extract(micro_extract_config(image_folder, out, **base, seed=1, overwrite=True))
    cache = open_cache(out)
    assert cache.manifest.seed == 1 and len(cache) == 12


def test_changed_dataset_is_refused(tmp_path):
    data = _write_images(tmp_path / "imgs", 4)
    out = tmp_path / "c"
    run_extract(micro_extract_config(data, out, views=1))
    _write_images(tmp_path / "more", 1)
    (data / "class0" / "zz.jpg").write_bytes((tmp_path / "more" / "class0" / "img00000.jpg").read_bytes())
    with pytest.raises(UserError, match="source_fingerprint"):
        run_extract(micro_extract_config(data, out, views=1))


def test_existing_non_cache_directory_or_file_is_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a g2sd-cache cache"):
        run_extract(micro_extract_config(image_folder, out))
    assert (out / "notes.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["notes.txt"]
    # --out naming an existing file: a one-line error, not a traceback
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert cli_main(_cli_args(image_folder, f)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("g2sd-cache extract: error:"), err
    assert f.read_text() == "x"
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    run_extract(micro_extract_config(image_folder, tmp_path / "empty", views=1))
    assert len(open_cache(tmp_path / "empty")) == 12


def test_bad_arguments_are_one_line_user_errors(image_folder, tmp_path):
    bad = [dict(arch="mae_vit_nope"), dict(codec="fp4"), dict(target_layer=5), dict(target_layer=0),
           dict(mask_ratio=1.0), dict(img_size=60), dict(views=0), dict(shard_size=0), dict(batch_size=0),
           dict(workers=-1), dict(on_error="ignore"), dict(teacher=str(tmp_path / "missing.pth"))]
    for kw in bad:
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, tmp_path / "c", **kw))
        assert "\n" not in str(e.value), kw
    assert not (tmp_path / "c" / MANIFEST).exists()


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2_for_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    r = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", *_cli_args(tmp_path / "empty", tmp_path / "c")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("g2sd-cache extract: error: --data") and "no images" in lines[0]
    assert not (tmp_path / "c").exists() or not (tmp_path / "c" / MANIFEST).exists()


# ----------------------------------------------------------------------------------------------
# sources, processes, workers

def _tar_keys(path):
    with tarfile.open(path) as t:
        return [m.name.rsplit(".", 1)[0] for m in t.getmembers()]


def test_tar_sources_one_shard_per_tar_keyed_by___key__(tmp_path, teacher):
    tars = make_tar_shards(tmp_path / "tars", count=7, per_shard=4, seed=2)  # 4 + 3 samples
    # a third tar with a garbage image and a sample without an image between good ones
    good = [jpeg_bytes(synthetic_image(100 + i, (90, 70))) for i in range(2)]
    bad_tar = tmp_path / "tars" / "train-000002.tar"
    with tarfile.open(bad_tar, "w") as t:
        for name, data in [("a0.jpg", good[0]), ("a1.jpg", b"garbage" * 10), ("a2.txt", b"no image"),
                           ("a3.jpg", good[1])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    spec = str(tmp_path / "tars" / "train-{000000..000002}.tar")
    out = tmp_path / "c"
    run_extract(micro_extract_config(spec, out, views=2))
    cache = open_cache(out)
    m = cache.manifest
    assert m.source.kind == "tars" and m.source.shards == tuple(str(p) for p in [*tars, bad_tar])
    assert [s.images for s in m.shards] == [4, 3, 2]
    assert [s.tar for s in m.shards] == list(m.source.shards)
    assert sorted(s["key"] for s in m.skipped) == ["a1", "a2"]
    assert m.images == 9 and m.views == 18 == len(cache) and m.source.count == 11
    members = [_tar_keys(tars[0]), _tar_keys(tars[1]), ["a0", "a3"]]
    geometry = _geometry(cache)
    images = {}
    for p in [*tars, bad_tar]:
        with tarfile.open(p) as t:
            for mem in t.getmembers():
                images[mem.name.rsplit(".", 1)[0]] = t.extractfile(mem).read()
    for s, keys in enumerate(members):
        for view in range(2):
            b = cache.read_block(s, view, 0, len(keys))
            assert [str(k) for k in b.key] == keys
            assert b.source_index.tolist() == [source_index_for_tar(s, p) for p in range(len(keys))]
    for i in range(len(cache)):
        rec = cache[i]
        img = decode_image(images[rec.key])
        v = sample_view(m.seed, rec.source_index, rec.view, img.size, geometry)
        assert rec.crop == v.crop and rec.flip == v.flip and np.array_equal(rec.mask.numpy(), v.mask)
        assert _rel(rec.target, _replay(cache, img, rec, teacher)) < BOUNDS["fp16"]


@pytest.mark.slow
def test_dataloader_workers_give_the_same_cache(image_folder, micro_cache, tmp_path):
    out = tmp_path / "w2"
    run_extract(micro_extract_config(image_folder, out, workers=2))
    _assert_same_cache(out, micro_cache)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_give_disjoint_complete_shards(image_folder, micro_cache, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "g2sd_cache.cli.main", *_cli_args(image_folder, out)]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / MANIFEST).read_text())
    names = [s["name"] for s in m["shards"]]
    assert names == ["shard-00000", "shard-00001", "shard-00002"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names  # no temporaries, no extra shards
    cache = open_cache(out)
    seen = [(cache[i].key, cache[i].view) for i in range(len(cache))]
    assert len(seen) == len(set(seen)) == 24
    # rank r wrote shards r, r + 2, ...: each shard exactly once, equal to a single process's
    _assert_same_cache(out, micro_cache)


# ----------------------------------------------------------------------------------------------
# inspect

def test_inspect_prints_bytes_per_view_and_every_codecs_error(micro_cache, capsys):
    from g2sd_cache.cache.inspect import inspect_report
    assert cli_main(["inspect", str(micro_cache)]) == 0
    text = capsys.readouterr().out
    r = inspect_report(str(micro_cache))
    m = open_cache(micro_cache).manifest
    on_disk = sum(sum(s.files.values()) for s in m.shards)
    assert r["bytes"] == on_disk == sum(p.stat().st_size for s in m.shards for p in (micro_cache / s.name).rglob("*")
                                        if p.is_file() and p.name != "shard.json")
    assert r["bytes_per_view"] == pytest.approx(on_disk / 24)
    assert f"{r['bytes_per_view']:.0f} B/view" in text
    assert r["target_bytes_per_view"] == 17 * 32 * 2
    lines = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in BOUNDS}
    assert sorted(lines) == sorted(BOUNDS)
    for codec, line in lines.items():
        e = m.codec_error[codec]
        assert f"{100 * e['rel_rmse']:.3f} %" in line and f"{e['cosine']:.6f}" in line
        assert 0 < e["rel_rmse"] < BOUNDS[codec]
        assert r["stored_error"][codec]["rel_rmse"] < BOUNDS[codec]
    assert r["stored_error"]["fp16"]["rel_rmse"] == 0.0  # fp16-stored values re-encode to fp16 exactly
    assert cli_main(["inspect", str(micro_cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"] == 24


def test_the_teacher_precision_is_chosen_recorded_shown_and_applied(image_folder, tmp_path, capsys):
    """--teacher-precision: auto is fp16 on CUDA (G2SD's stage-1 teacher runs under torch.cuda.amp.autocast) and
    fp32 on CPU; fp16 on CPU is refused in one line. A bf16 extract records bf16-autocast in the manifest,
    inspect shows it, its targets really come from bf16 arithmetic (they differ from the fp32 cache's by more
    than fp16 rounding yet by less than bf16's coarse bound), and verify --deep replays it in bf16 and passes."""
    from g2sd_cache.training.precision import resolve_teacher_precision
    from g2sd_cache.verify.cache import verify_cache
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (resolve_teacher_precision("auto", cuda), resolve_teacher_precision("auto", cpu)) == ("fp16", "fp32")
    assert resolve_teacher_precision("auto", cuda, auto="fp32") == "fp32"
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        resolve_teacher_precision("fp16", cpu)
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        run_extract(micro_extract_config(image_folder, tmp_path / "h", teacher_precision="fp16"))
    caches = {}
    for p in ("auto", "bf16"):
        caches[p] = tmp_path / p
        run_extract(micro_extract_config(image_folder, caches[p], teacher_precision=p))
    recorded = {p: json.loads((c / MANIFEST).read_text())["teacher_precision"] for p, c in caches.items()}
    assert recorded == {"auto": "fp32", "bf16": "bf16-autocast"}
    a, b = open_cache(str(caches["auto"])), open_cache(str(caches["bf16"]))
    ta = torch.stack([a[i].target.float() for i in range(len(a))])
    tb = torch.stack([b[i].target.float() for i in range(len(b))])
    rel = float((ta - tb).norm() / ta.norm())
    assert 2e-3 < rel < 5e-2, rel
    assert cli_main(["inspect", str(caches["bf16"])]) == 0
    assert "ran in bf16-autocast" in capsys.readouterr().out
    report = verify_cache(str(caches["bf16"]), deep=4, device="cpu")
    assert report.ok, report.problems
    assert report.summary["deep"]["precision"] == "bf16" and report.summary["deep"]["compute_allowance"] > 0
