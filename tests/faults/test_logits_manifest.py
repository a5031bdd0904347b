"""Promise 3 for logits caches: `finetune --logits` runs verify's manifest checks before training, as `train` does
for target caches, so a hand-edited manifest is one line naming it, never a run on wrong predictions or an
IndexError mid-epoch."""
from __future__ import annotations

import json
import shutil

import pytest

from g2sd_cache.common.errors import UserError
from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig
from g2sd_cache.specific.extract_logits import run_extract_logits
from g2sd_cache.specific.finetune import finetune
from g2sd_cache.verify.logits import verify_logits
from tests.common.faults import one_line

MICRO = "test_vit_micro_patch16"
PLAN = dict(img_size=32, group_size=4)     # image_folder: 12 images in 3 classes -> 3 groups per epoch


@pytest.fixture(scope="module")
def logits_cache(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits") / "lc"
    run_extract_logits(LogitsConfig(data=str(image_folder), out=str(out), teacher="random:1", teacher_arch=MICRO,
                                    cached_epochs=2, topk=2, shard_groups=2, workers=0, device="cpu", **PLAN))
    return out


def _edit_teacher(m: dict) -> None:
    m["teacher"]["sha256"] = "0" * 64


@pytest.mark.parametrize("edit", [{"num_classes": 5}, {"epochs": 3}, {"topk": 3}, {"groups_per_epoch": 4},
                                  {"shards": "groups"}, {"teacher": "sha256"}], ids=lambda e: next(iter(e)))
def test_finetune_refuses_a_hand_edited_logits_manifest(logits_cache, image_folder, tmp_path, edit):
    c = tmp_path / "lc"
    shutil.copytree(logits_cache, c)
    m = json.loads((c / "manifest.json").read_text())
    key, value = next(iter(edit.items()))
    if key == "shards":
        m["shards"][0]["groups"] += 1
    elif key == "teacher":
        _edit_teacher(m)
    else:
        m[key] = value
    (c / "manifest.json").write_text(json.dumps(m))
    assert not verify_logits(str(c)).ok
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        finetune(FinetuneConfig(data=str(image_folder), out=str(run), init="unused", logits=str(c), arch=MICRO,
                                teacher_arch=MICRO, epochs=2, workers=0, device="cpu", **PLAN))
    assert "does not agree with its manifest" in one_line(e.value) and f"verify {c}" in str(e.value)
    assert not (run / "checkpoint.pt").exists()
