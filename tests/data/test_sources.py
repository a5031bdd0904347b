"""Sources on their own: the folder listing, its fingerprint, tar specs and the one-line refusals."""
import pytest

from g2sd_cache.common.errors import UserError
from g2sd_cache.data.sources import FolderSource, TarSource, open_source
from g2sd_cache.data.synthetic import make_image_folder, make_tar_shards


def test_a_folder_lists_images_in_sorted_relative_paths_and_reads_them(tmp_path):
    root = make_image_folder(tmp_path / "img", 6, seed=0, classes=2)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    src = open_source(str(root))
    assert isinstance(src, FolderSource) and len(src) == 6
    assert list(src.keys) == sorted(src.keys) and all(k.startswith("class") for k in src.keys)
    assert src.read(src.keys[0]) == (root / src.keys[0]).read_bytes()
    assert src.kind == "folder" and len(src.fingerprint) == 64


def test_the_fingerprint_changes_with_the_listing(tmp_path):
    root = make_image_folder(tmp_path / "img", 4, seed=0, classes=1)
    before = FolderSource.scan(str(root)).fingerprint
    assert FolderSource.scan(str(root)).fingerprint == before
    key = FolderSource.scan(str(root)).keys[0]
    (root / key).write_bytes((root / key).read_bytes() + b"\0")          # one byte longer
    assert FolderSource.scan(str(root)).fingerprint != before


def test_tar_specs_expand_braces_and_commas_and_stream_samples(tmp_path):
    tars = make_tar_shards(tmp_path, count=5, per_shard=2, seed=0)
    spec = str(tmp_path / "train-{000000..000002}.tar")
    src = open_source(spec)
    assert isinstance(src, TarSource) and list(src.urls) == [str(t) for t in tars]
    assert open_source(",".join(src.urls)).urls == src.urls
    keys = [k for k, data in src.samples(0, on_error=lambda e: False)]
    assert len(keys) == 2 and all(data for _, data in src.samples(0, on_error=lambda e: False))


@pytest.mark.parametrize("spec,match", [("missing-{000..003}.tar", "does not exist"), ("nothing-here", "not an image folder")])
def test_bad_data_specs_are_one_line(tmp_path, spec, match):
    with pytest.raises(UserError, match=match) as e:
        open_source(str(tmp_path / spec))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        open_source(str(empty))
