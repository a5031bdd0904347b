"""Promise 8, mismatches are refused: another dataset, teacher, patch size or configuration.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import shutil

import pytest

from tests.common.helpers import micro_extract_config
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import STUDENT_PRESETS, ViTShape
from g2sd_cache.cache.schema import MANIFEST
from g2sd_cache.data.synthetic import jpeg_bytes, synthetic_image
from g2sd_cache.generic.train import train
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import copy_cache, micro_train_config, one_line


# ----------------------------------------------------------------------------------------------
# 6. configuration faults

def test_train_refuses_a_different_source_listing(micro_cache, image_folder, tmp_path):
    """Mismatches are refused: train refuses, in one line, a cache whose source listing differs from --data (an image added)."""
    data = tmp_path / "img"
    shutil.copytree(image_folder, data)
    (data / "class000" / "extra.jpg").write_bytes(jpeg_bytes(synthetic_image(999, (100, 90))))
    with pytest.raises(UserError) as e:
        train(micro_train_config(data, micro_cache, tmp_path / "run"))
    assert "--data" in one_line(e.value) and "not the dataset the cache was extracted from" in str(e.value)


def test_train_refuses_another_teacher_in_replay_mode(micro_cache, image_folder, tmp_path):
    """Mismatches are refused: in replay mode train refuses, in one line, a teacher whose weights differ from the cache's."""
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", teacher="random:1"))
    assert "not the teacher that made the cache" in one_line(e.value)


def test_train_refuses_a_student_with_another_patch_size(micro_cache, image_folder, tmp_path, monkeypatch):
    """Mismatches are refused: train refuses, in one line, a student whose patch size differs from the cache's views."""
    monkeypatch.setitem(STUDENT_PRESETS, "test_vit_micro_patch8", ViTShape(8, 48, 2, 2, 32, 1, 1))
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", student="test_vit_micro_patch8"))
    assert "patch size 8" in one_line(e.value)


@pytest.mark.parametrize("change", [{"teacher": "random:1"}, {"target_layer": 3}, {"mask_ratio": 0.5},
                                    {"img_size": 32}, {"arch": "mae_vit_base_patch16"}])
def test_extract_refuses_rerun_with_another_configuration(micro_cache, image_folder, tmp_path, change):
    """Mismatches are refused: rerunning extract into an existing cache with another teacher, target layer, mask ratio, image
    size or architecture is refused in one line naming the setting, and the cache is left untouched."""
    c = copy_cache(micro_cache, tmp_path / "c")
    before = (c / MANIFEST).read_bytes()
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, c, **change))
    key = next(iter(change))
    assert key in one_line(e.value) and "--overwrite" in str(e.value)
    assert (c / MANIFEST).read_bytes() == before
    assert verify_cache(str(c)).ok


def test_resume_knows_its_cache_by_content_not_by_how_its_path_is_written(micro_cache, image_folder, tmp_path,
                                                                           monkeypatch, capsys):
    """Mismatches are refused: `train --resume` accepts the same cache named by its absolute path after a run
    started with a relative one (noting the change), and refuses the same path once it holds a cache re-extracted
    with another codec, naming the codec."""
    c = copy_cache(micro_cache, tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(micro_train_config(image_folder, "c", run, steps=3, stop_after=1))
    capsys.readouterr()
    train(micro_train_config(image_folder, str(c.resolve()), run, steps=3, stop_after=2, resume=True))
    assert "(the same content)" in capsys.readouterr().out
    run_extract(micro_extract_config(image_folder, c, codec="int8", overwrite=True))
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, "c", run, steps=3, resume=True))
    assert "not the cache the run was trained on" in one_line(e.value) and "codec fp16 -> int8" in str(e.value)
