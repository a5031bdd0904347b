"""The pixel path's host decoding of a lossless cache: frames decompressed straight from the shard file's bytes
into batch rows (`lossless.decompress_spans`, through cache/blosc_ctx.py), against the filter as the reference."""
import numpy as np
import pytest

from g2sd_cache.cache import blosc_ctx, lossless

N_KEEP, P = 4, 16


def _frames(views: np.ndarray, gap: int = 7) -> tuple[bytes, list[tuple[int, int]]]:
    """Frames of `views` laid end to end in one buffer, `gap` junk bytes before each: (buffer, [(offset, length)])."""
    buf, spans = b"", []
    for v in views:
        blob = lossless.encode(v)
        buf += b"\xab" * gap
        spans.append((len(buf), len(blob)))
        buf += blob
    return buf, spans


@pytest.fixture(params=["c-blosc by address", "numcodecs"])
def path(request, monkeypatch):
    if request.param == "numcodecs":
        monkeypatch.setattr(blosc_ctx, "DECOMPRESS", None)
    return request.param


def test_the_c_blosc_function_is_found_here():
    assert blosc_ctx.DECOMPRESS is not None     # else the pixel path silently runs the slower numcodecs wrapper


def test_frames_land_in_their_rows_as_the_filter_wrote_them(path):
    views = np.random.default_rng(0).integers(0, 256, (3, N_KEEP, P, P, 3), dtype=np.uint8)
    views[1] = 200                                   # a flat view compresses to another length
    buf, spans = _frames(views)
    dest = np.zeros((5, *lossless.residual_shape(N_KEEP, P)), np.uint8)
    lossless.decompress_spans(buf, spans, dest, [4, 0, 2])
    want = lossless.filter_patches(views)
    assert np.array_equal(dest[[4, 0, 2]], want)
    assert not dest[[1, 3]].any()                    # rows outside `at` untouched
    assert dest[0, 0, 1, 0, 0] == 200 and not dest[0, 0, 1, 1:, :].any()   # flat G plane: one corner value, then 0


def test_a_bad_frame_is_refused_with_its_reason(path):
    views = np.random.default_rng(1).integers(0, 256, (2, N_KEEP, P, P, 3), dtype=np.uint8)
    views[1] = 9                                     # compressed (random bytes are stored as they are)
    buf, spans = _frames(views)
    dest = np.zeros((2, *lossless.residual_shape(N_KEEP, P)), np.uint8)
    (o0, n0), (o1, n1) = spans
    with pytest.raises(ValueError, match=f"frame of {n0 - 10} bytes says it has {n0}"):
        lossless.decompress_spans(buf, [(o0, n0 - 10)], dest, [0])
    with pytest.raises(ValueError, match="shorter than its header"):
        lossless.decompress_spans(buf, [(o0, 8)], dest, [0])
    small = lossless.encode(views[0, :2])
    with pytest.raises(ValueError, match="frame of 1536 bytes decoded, not the 3072 of a view"):
        lossless.decompress_spans(small, [(0, len(small))], dest, [0])
    junk = bytearray(buf)
    junk[o1 + 16:o1 + n1] = b"\xff" * (n1 - 16)      # header intact, body garbage
    with pytest.raises(ValueError, match="does not decompress"):
        lossless.decompress_spans(bytes(junk), [(o1, n1)], dest, [1])


def test_a_span_past_the_end_of_the_file_is_refused():
    views = np.random.default_rng(2).integers(0, 256, (1, N_KEEP, P, P, 3), dtype=np.uint8)
    buf, [(o, n)] = _frames(views)
    dest = np.zeros((1, *lossless.residual_shape(N_KEEP, P)), np.uint8)
    with pytest.raises(ValueError, match="outside its file"):
        lossless.decompress_spans(buf[:o + n - 1], [(o, n)], dest, [0])


def test_rows_outside_the_batch_fail_as_numpy_indexing_does():
    views = np.random.default_rng(3).integers(0, 256, (1, N_KEEP, P, P, 3), dtype=np.uint8)
    buf, spans = _frames(views)
    dest = np.zeros((2, *lossless.residual_shape(N_KEEP, P)), np.uint8)
    with pytest.raises(IndexError):
        lossless.decompress_spans(buf, spans, dest, [2])
    lossless.decompress_spans(buf, spans, dest, [-1])    # numpy's meaning: the last row
    assert np.array_equal(dest[1], lossless.filter_patches(views[0])) and not dest[0].any()
