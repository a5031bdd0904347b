"""--shuffle-span is part of the data order: a resume keeps it, and a checkpoint written before the option existed
resumes as the whole-epoch shuffle it trained with (span 0)."""
import pytest
import torch

from g2sd_cache.common.errors import UserError
from tests.generic.test_train import metrics, run_train


def test_a_resume_keeps_the_shuffle_span_and_older_checkpoints_count_as_the_whole_epoch(micro_cache, tmp_path):
    kw = dict(cache=str(micro_cache), steps=4, batch_size=4, shuffle_window=2)
    full = run_train(tmp_path / "full", None, shuffle_span=4, **kw)
    run = tmp_path / "r"
    run_train(run, None, shuffle_span=4, stop_after=2, save_every=1, **kw)
    with pytest.raises(UserError, match="shuffle_span differ"):
        run_train(run, None, shuffle_span=0, resume=True, **kw)
    assert [m["loss"] for m in run_train(run, None, shuffle_span=4, resume=True, **kw)] == \
        pytest.approx([m["loss"] for m in full], rel=1e-5)
    # a checkpoint without the option: trained with the whole-epoch shuffle, so it resumes with span 0 only
    old = tmp_path / "old"
    run_train(old, None, stop_after=2, save_every=1, **kw)
    ckpt = torch.load(old / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["shuffle_span"]
    torch.save(ckpt, old / "checkpoint.pt")
    with pytest.raises(UserError, match="shuffle_span differ"):
        run_train(old, None, shuffle_span=4, resume=True, **kw)
    assert len(run_train(old, None, resume=True, **kw)) == 4 == len(metrics(old))
