"""Test set-up shared by every test file: the Triton interpreter, and small seeded datasets and caches.

TRITON_INTERPRET must be set before anything imports the kernel module: Triton decides at decoration
time whether a @triton.jit function runs compiled or interpreted. It defaults to 1 here (CI has no GPU);
run with TRITON_INTERPRET=0 on a CUDA machine to test the compiled kernel.

Fixtures build everything from seeds (no downloads): JPEG folders of small images and caches made
with the micro teacher at 64-px crops (tests/common/helpers.py), so a whole extract takes seconds.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tests.common.helpers import micro_extract_config  # noqa: E402

from g2sd_cache.generic.extract import run_extract  # noqa: E402
from g2sd_cache.data.synthetic import make_image_folder  # noqa: E402
from g2sd_cache.models.mae import build_student as build_stage1_student  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """CI machines have few, shared cores: one intra-op thread is several times faster under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """12 small JPEGs of varied sizes in 3 class folders."""
    root = tmp_path_factory.mktemp("images")
    return make_image_folder(root, 12, seed=1, classes=3, vary_size=True)


@pytest.fixture(scope="session")
def micro_cache(image_folder, tmp_path_factory) -> Path:
    """A finished fp16 cache of `image_folder`: 12 images x 2 views, 4 images per shard (3 shards)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    run_extract(micro_extract_config(image_folder, out))
    return out


@pytest.fixture(scope="session")
def micro_cache_no_pixels(image_folder, tmp_path_factory) -> Path:
    """`micro_cache` extracted with --pixels none: the same views and targets, training reads the images."""
    out = tmp_path_factory.mktemp("cache-nopix") / "c"
    run_extract(micro_extract_config(image_folder, out, pixels="none"))
    return out


@pytest.fixture(scope="session")
def stage1_export(tmp_path_factory) -> Path:
    """A stage-1 micro student's encoder, as `g2sd-cache export` writes it: stage 2's --init."""
    path = tmp_path_factory.mktemp("stage1") / "encoder.pth"
    torch.save(build_stage1_student("test_vit_micro_patch16_dec32d1b", 32, 32, seed=5).encoder_state_dict(), path)
    return path
