"""A stage-1 student exported with `--format mae` loads into G2SD's detection and segmentation backbones.

The layouts below are written out from pengzhiliang/G2SD (not imported: detectron2, mmcv and mmseg are not
dependencies here):
- detection, ViTDet Mask R-CNN (G2SD_det_dis/detectron2/modeling/backbone/vit.py, class ViT): the model holds the
  encoder at `backbone.net.`; patch_embed.proj, pos_embed [1, (224/16)^2 + 1, D] (pretrain_use_cls_token=True,
  pretrain_img_size=224), blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, plus rel_pos_h / rel_pos_w
  (zero-initialised, never in an MAE checkpoint); no cls_token, no final norm. DetectionCheckpointer._load_file
  wraps a .pth's {'model': ...} with matching_heuristics (detection_checkpoint.py:91-94), so _load_model aligns it
  by align_and_update_state_dicts (:119-126): a checkpoint key goes to the model key that ends with it.
- segmentation, UperNet (G2SD_seg_dis/src/backbone/mae.py, class MAE): patch_embed.proj, cls_token [1, 1, D],
  pos_embed [1, N + 1, D], the same block names, fpn1..fpn4 (new); no final norm. MAE.init_weights loads with
  load_checkpoint(self, pretrained, strict=False).
"""
import pytest

from g2sd_cache.models.mae import build_student

STUDENTS = {"mae_vit_small_patch16_dec256d4b": (384, 12), "mae_vit_tiny_patch16_dec128d4b": (192, 12)}
BLOCK = {"norm1.weight": "d", "norm1.bias": "d", "attn.qkv.weight": "3d,d", "attn.qkv.bias": "3d",
         "attn.proj.weight": "d,d", "attn.proj.bias": "d", "norm2.weight": "d", "norm2.bias": "d",
         "mlp.fc1.weight": "4d,d", "mlp.fc1.bias": "4d", "mlp.fc2.weight": "d,4d", "mlp.fc2.bias": "d"}


def _shape(spec: str, d: int) -> tuple:
    return tuple({"d": d, "3d": 3 * d, "4d": 4 * d}[s] for s in spec.split(","))


def vitdet_backbone(d: int, depth: int) -> dict:
    """ViTDet's ViT weights (rel_pos excluded: zero-initialised, not pretrained) under backbone.net."""
    keys = {"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,), "pos_embed": (1, 197, d)}
    keys |= {f"blocks.{i}.{k}": _shape(s, d) for i in range(depth) for k, s in BLOCK.items()}
    return {f"backbone.net.{k}": v for k, v in keys.items()}


def seg_backbone(d: int, depth: int) -> dict:
    keys = {"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
            "pos_embed": (1, 197, d)}
    return keys | {f"blocks.{i}.{k}": _shape(s, d) for i in range(depth) for k, s in BLOCK.items()}


def align_by_suffix(model_keys, ckpt_keys) -> dict:
    """detectron2's rule: each model key takes the longest checkpoint key it ends with (at a '.' boundary)."""
    out = {}
    for mk in model_keys:
        hits = [ck for ck in ckpt_keys if mk == ck or mk.endswith("." + ck)]
        if hits:
            out[mk] = max(hits, key=len)
    return out


@pytest.mark.parametrize("preset", list(STUDENTS))
def test_the_mae_export_fills_g2sds_detection_and_segmentation_backbones(preset):
    d, depth = STUDENTS[preset]
    state = {"model": build_student(preset, 768).encoder_state_dict()}["model"]   # what export --format mae saves
    ckpt = {k: tuple(v.shape) for k, v in state.items()}

    det = vitdet_backbone(d, depth)
    matched = align_by_suffix(det, ckpt)
    assert set(matched) == set(det), sorted(set(det) - set(matched))[:5]      # every backbone weight is loaded
    assert all(matched[k] == k[len("backbone.net."):] and ckpt[matched[k]] == det[k] for k in det)
    assert set(ckpt) - set(matched.values()) == {"cls_token", "norm.weight", "norm.bias"}   # unused there

    seg = seg_backbone(d, depth)
    assert all(ckpt.get(k) == shape for k, shape in seg.items()), [k for k in seg if ckpt.get(k) != seg[k]][:5]
    assert set(ckpt) - set(seg) == {"norm.weight", "norm.bias"}        # strict=False: the final norm is unused
