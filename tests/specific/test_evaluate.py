"""Top-1 / top-5 evaluation on a tiny labelled folder and on `.cls` tars, against accuracy counted by hand."""
import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from g2sd_cache.models.classifier import build_student
from g2sd_cache.common.errors import UserError
from g2sd_cache.specific.evaluate import eval_transform, evaluate

# Six classes, one solid colour each; folder names sort in palette order.
CLASSES = ["a_black", "b_white", "c_red", "d_green", "e_blue", "f_grey"]
PALETTE = np.array([(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]) / 255

# (folder, colour of the image in it). By hand, with the colour classifier below (nearest palette colour):
#   7 images sit in their own colour's folder                      -> top-1 hits: 7 of 9
#   white in a_black: black is white's farthest colour (rank 6)    -> top-5 miss
#   green in f_grey: grey is green's 2nd nearest colour            -> top-5 hit
#   => top-1 = 7 / 9, top-5 = 8 / 9
IMAGES = [("a_black", 0), ("a_black", 0), ("a_black", 1), ("b_white", 1), ("c_red", 2), ("d_green", 3),
          ("e_blue", 4), ("f_grey", 5), ("f_grey", 3)]
TOP1, TOP5 = 100 * 7 / 9, 100 * 8 / 9


class ColourClassifier(nn.Module):
    """logit_k = -10 * squared distance between the image's mean colour and palette colour k."""

    num_classes = len(CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)   # ImageNet's, literal
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = (x * std + mean).mean(dim=(2, 3))
        return -10 * ((rgb[:, None, :] - torch.tensor(PALETTE, dtype=torch.float32)[None]) ** 2).sum(-1)


def _png(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), tuple(int(round(c * 255)) for c in PALETTE[colour])).save(buf, format="PNG")
    return buf.getvalue()


def _expected_loss() -> float:
    total = 0.0
    for folder, colour in IMAGES:
        logits = -10 * ((PALETTE[colour][None] - PALETTE) ** 2).sum(-1)
        total += np.log(np.exp(logits).sum()) - logits[CLASSES.index(folder)]
    return total / len(IMAGES)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    for i, (folder, colour) in enumerate(IMAGES):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / f"img{i}.png").write_bytes(_png(colour))
    return root


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def val_tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("valtars")
    samples = [(f"s{i:03d}", {"png": _png(colour), "cls": str(CLASSES.index(folder)).encode()})
               for i, (folder, colour) in enumerate(IMAGES)]
    _write_tar(root / "val-000000.tar", samples[:5])
    _write_tar(root / "val-000001.tar", samples[5:])
    return str(root / "val-{000000..000001}.tar")


def test_accuracy_on_a_labelled_folder_is_the_count_by_hand(val_folder):
    result = evaluate(ColourClassifier(), str(val_folder), img_size=32, batch_size=4)
    assert result["n"] == 9
    assert result["top1"] == pytest.approx(TOP1) and result["top5"] == pytest.approx(TOP5)
    assert result["loss"] == pytest.approx(_expected_loss(), rel=1e-4)


@pytest.mark.parametrize("workers", [0, 2])
def test_accuracy_on_cls_tars_is_the_count_by_hand(val_tars, workers):
    result = evaluate(ColourClassifier(), val_tars, img_size=32, batch_size=3, workers=workers)
    assert result["n"] == 9 and result["top1"] == pytest.approx(TOP1) and result["top5"] == pytest.approx(TOP5)


def test_training_classes_map_a_partial_val_folder_by_name(tmp_path):
    for i, (folder, colour) in enumerate([("f_grey", 5), ("c_red", 2), ("c_red", 4)]):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{i}.png").write_bytes(_png(colour))
    result = evaluate(ColourClassifier(), str(tmp_path), classes=CLASSES, img_size=32)
    assert result["n"] == 3 and result["top1"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(UserError, match="has 2 class folders but the model has 6 classes"):
        evaluate(ColourClassifier(), str(tmp_path), img_size=32)
    with pytest.raises(UserError, match="f_grey are not among the 2 classes"):
        evaluate(ColourClassifier(), str(tmp_path), classes=["a", "c_red"], img_size=32)


def test_eval_transform_is_g2sds():
    """Resize the shorter side to 256 (S / 0.875), centre crop 224, bicubic; above 224 no border is cut."""
    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and "BICUBIC" in str(resize.interpolation) and crop.size == (224, 224)
    assert eval_transform(384).transforms[0].size == 384
    out = eval_transform(32)(Image.new("RGB", (60, 45), (255, 0, 0)))
    assert out.shape == (3, 32, 32)


def test_model_and_its_saved_file_evaluate_the_same(val_folder, tmp_path):
    student = build_student("test_vit_micro_patch16", num_classes=6, img_size=32, seed=2)
    torch.save({"model": student.state_dict()}, tmp_path / "student.pth")
    from_module = evaluate(student, str(val_folder))
    assert student.training  # evaluate restores the mode it found
    assert evaluate(str(tmp_path / "student.pth"), str(val_folder)) == from_module


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_labels_are_one_line_errors(tmp_path, workers):
    no_label = _write_tar(tmp_path / "a.tar", [("x", {"png": _png(0)})])
    with pytest.raises(UserError, match="^.*a.tar: sample x has no .cls label") as e:
        evaluate(ColourClassifier(), str(no_label), img_size=32, workers=workers)
    assert "\n" not in str(e.value)
    out_of_range = _write_tar(tmp_path / "b.tar", [("x", {"png": _png(0), "cls": b"6"})])
    with pytest.raises(UserError, match="class index 6 is out of range"):
        evaluate(ColourClassifier(), str(out_of_range), img_size=32)
    not_a_number = _write_tar(tmp_path / "c.tar", [("x", {"png": _png(0), "cls": b"cat"})])
    with pytest.raises(UserError, match="expected a non-negative integer"):
        evaluate(ColourClassifier(), str(not_a_number), img_size=32)


@pytest.mark.parametrize("keep, message", [(700, "cannot read the tar: ReadError"), (None, "has no .cls label")])
def test_truncated_tar_is_a_one_line_error(tmp_path, keep, message):
    good = _write_tar(tmp_path / "good.tar", [(f"s{i}", {"png": _png(0), "cls": b"0"}) for i in range(3)])
    data = good.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: keep or len(data) // 2])  # inside the first member / the last
    with pytest.raises(UserError, match=f"cut.tar: .*{message}") as e:
        evaluate(ColourClassifier(), str(tmp_path / "cut.tar"), img_size=32)
    assert "\n" not in str(e.value)
