"""Stage 2's logits cache on an object store (a moto S3 server on 127.0.0.1): extract-logits writes the same cache as
on a disk, resumes after a killed upload and keeps the ownership promises; finetune reads it through a checked
node-local copy with the local run's losses; verify and inspect take the URL; a corrupted object is refused by
name and never lands under a final name."""
from __future__ import annotations

import json

import fsspec
import pytest
import torch

from g2sd_cache.cache import logits_remote
from g2sd_cache.cache.schema import LOCK_FILE, MANIFEST, SHARD_RECORD
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import build_student as build_stage1_student
from g2sd_cache.specific.extract_logits import run_extract_logits
from tests.common.helpers import micro_extract_config
from tests.remote.test_extract_url import _local_files, _remote_files, _same_cache
from tests.specific.test_finetune import logits_config, run_finetune


@pytest.fixture(scope="module")
def stage1_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage1") / "encoder.pth"
    torch.save(build_stage1_student("test_vit_micro_patch16_dec32d1b", 32, 32, seed=5).encoder_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def local_logits(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lg") / "lc"
    run_extract_logits(logits_config(image_folder, out))
    return out


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def test_extract_logits_to_s3_equals_local_resumes_and_finetunes_with_the_local_losses(
        s3_bucket, image_folder, local_logits, stage1_encoder, tmp_path, monkeypatch):
    url = f"{s3_bucket}/logits"
    staging = tmp_path / "staging"
    run_extract_logits(logits_config(image_folder, url, staging=str(staging)))
    _same_cache(_remote_files(url), _local_files(local_logits))
    fs, path = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{path}/{LOCK_FILE}") and list(staging.iterdir()) == []
    # a killed upload: shard 1 without its commit record, no manifest; the rerun redoes exactly that
    fs.rm_file(f"{path}/shard-00001/{SHARD_RECORD}")
    fs.rm_file(f"{path}/{MANIFEST}")
    kept = {p: fs.info(p)["LastModified"] for p in fs.find(f"{path}/shard-00000")}
    run_extract_logits(logits_config(image_folder, url))
    _same_cache(_remote_files(url), _local_files(local_logits))
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{path}/shard-00000")} == kept

    fetched = []
    real = logits_remote._fetch
    monkeypatch.setattr(logits_remote, "_fetch", lambda *a: (fetched.append(a[2]), real(*a))[1])
    local = run_finetune(tmp_path / "local", image_folder, stage1_encoder, logits=str(local_logits))
    remote = run_finetune(tmp_path / "remote", image_folder, stage1_encoder, logits=url,
                          local_cache=str(tmp_path / "copy"))
    assert _losses(remote) == _losses(local) and len(local) > 0
    # every shard file once; the copy is the cache, file for file
    assert sorted(fetched) == sorted(f"{url}/{rel}" for rel in _local_files(local_logits)
                                     if rel.startswith("shard-") and not rel.endswith(SHARD_RECORD))
    (copy,) = (tmp_path / "copy").iterdir()
    assert {rel: data for rel, data in _local_files(copy).items() if not rel.startswith(".")} == _remote_files(url)
    fetched.clear()            # a second run reads the local copy
    assert _losses(run_finetune(tmp_path / "again", image_folder, stage1_encoder, logits=url,
                                local_cache=str(tmp_path / "copy"))) == _losses(local)
    assert fetched == []


def test_verify_and_inspect_take_the_url_and_a_corrupted_object_is_refused_by_name(
        s3_bucket, image_folder, local_logits, stage1_encoder, tmp_path, capsys):
    url = f"{s3_bucket}/logits"
    fs, path = fsspec.core.url_to_fs(url)
    for p in sorted(local_logits.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{path}/{p.relative_to(local_logits).as_posix()}")
    assert cli_main(["verify", url]) == 0
    assert cli_main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert "logits cache" in out and "top-2 logits" in out
    victim = sorted(p for p in fs.find(f"{path}/shard-00001") if "/values/c/1/" in p)[0]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 3] ^= 0xFF        # one flipped bit in a chunk's body: same size, same index
    fs.pipe_file(victim, bytes(data))
    assert cli_main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"problem(s) in {url}" in out and "shard-00001" in out
    with pytest.raises(UserError, match=rf"logits cache {url}: shard shard-00001 is corrupt: values/c/1/\S+: inner "
                                        rf"chunk \d+ fails its crc32c \(the object {url}/shard-00001/values/c/1/\S+ "
                                        rf"on the store, downloaded twice\)"):
        run_finetune(tmp_path / "run", image_folder, stage1_encoder, logits=url, local_cache=str(tmp_path / "copy"))
    (copy,) = (tmp_path / "copy").iterdir()
    assert not (copy / "shard-00001" / "values" / "c" / "1").exists() or \
        not [p for p in (copy / "shard-00001" / "values" / "c" / "1").rglob("*") if p.is_file()]
    assert not (copy / MANIFEST).exists()


def test_a_logits_cache_on_a_url_keeps_its_ownership_promises(s3_bucket, image_folder, micro_cache, tmp_path):
    fs = fsspec.filesystem("s3")
    targets = f"{s3_bucket}/targets"
    run_extract(micro_extract_config(image_folder, targets))
    before = _remote_files(targets)
    for overwrite in (False, True):     # each command replaces only its own kind
        with pytest.raises(UserError, match=r"is a targets cache \(written by `g2sd-cache extract`\); extract-logits"):
            run_extract_logits(logits_config(image_folder, targets, overwrite=overwrite))
    assert _remote_files(targets) == before
    url = f"{s3_bucket}/logits"
    run_extract_logits(logits_config(image_folder, url))
    with pytest.raises(UserError, match=r"is a logits cache \(written by `g2sd-cache extract-logits`\); extract"):
        run_extract(micro_extract_config(image_folder, url, overwrite=True))
    with pytest.raises(UserError, match="other settings"):
        run_extract_logits(logits_config(image_folder, url, topk=3))
    fs.pipe_file(f"{url}/notes.txt", b"mine")
    with pytest.raises(UserError, match="notes.txt"):
        run_extract_logits(logits_config(image_folder, url, topk=3, overwrite=True))
    assert fs.cat_file(f"{url}/notes.txt") == b"mine"
    fs.rm_file(f"{url}/notes.txt")
    run_extract_logits(logits_config(image_folder, url, topk=3, overwrite=True))
    assert json.loads(fs.cat_file(f"{url}/{MANIFEST}"))["topk"] == 3
    photos = f"{s3_bucket}/photos"
    fs.pipe_file(f"{photos}/a.jpg", b"not ours")
    with pytest.raises(UserError, match="not a g2sd-cache cache"):
        run_extract_logits(logits_config(image_folder, photos, overwrite=True))
    assert fs.cat_file(f"{photos}/a.jpg") == b"not ours"
