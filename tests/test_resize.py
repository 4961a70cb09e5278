"""resize_frames: the fixed-size resize a model's duokit.json "frame_fit" applies before its processor."""

import numpy as np
import pytest

from duokit.data.resize import resize_frames


def test_frames_of_any_shape_come_out_at_the_size_asked_for_with_their_content():
    rng = np.random.default_rng(0)
    for height, width in ((56, 56), (120, 160), (240, 320), (360, 640), (90, 160)):
        frames = rng.integers(0, 256, size=(3, height, width, 3), dtype=np.uint8)
        out = resize_frames(frames, 56, 56)
        assert out.shape == (3, 56, 56, 3) and out.dtype == np.uint8
        assert np.array_equal(out, resize_frames(frames, 56, 56))  # same frames, same bytes
    # Aspect is not kept: a 4:3 frame whose left half is black and right half white stays split in the
    # middle of the square (a letterbox would add rows; a crop would lose columns).
    frame = np.zeros((1, 120, 160, 3), np.uint8)
    frame[:, :, 80:] = 255
    out = resize_frames(frame, 56, 56)
    assert (out[0, :, :27] == 0).all() and (out[0, :, 29:] == 255).all()
    # A flat colour stays exactly that colour; a frame already at the size is returned as is.
    flat = np.full((2, 240, 320, 3), (10, 200, 77), np.uint8)
    assert (resize_frames(flat, 56, 56) == (10, 200, 77)).all()
    square = rng.integers(0, 256, size=(2, 56, 56, 3), dtype=np.uint8)
    assert resize_frames(square, 56, 56) is square


def test_bad_frames_or_size_are_refused_with_what_was_given():
    with pytest.raises(ValueError, match="uint8 \\[T, H, W, 3\\].*float32"):
        resize_frames(np.zeros((1, 8, 8, 3), np.float32), 56, 56)
    with pytest.raises(ValueError, match="size must be positive, got 0x56"):
        resize_frames(np.zeros((1, 8, 8, 3), np.uint8), 0, 56)
