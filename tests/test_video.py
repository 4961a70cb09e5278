"""duokit.data.video: H.264 round trips on tiny synthetic clips, sampling rules, errors, needle coverage."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from duokit.data import video
from duokit.data.video import (
    VideoError,
    coverage_report,
    load_frames,
    needle_coverage,
    uniform_indices,
    write_video,
)

NUM_FRAMES, HEIGHT, WIDTH, FPS = 24, 48, 64, 12.0
# One flat colour per frame, far apart, so a decoded frame is identified by its nearest colour.
PALETTE = np.array([[(i * 53) % 256, (i * 97 + 40) % 256, 255 - i * 11] for i in range(NUM_FRAMES)], np.uint8)
MAX_MEAN_ABS_DIFF = 8  # H.264 is lossy; flat colours come back within a few levels
# Every reading test runs on each backend that works here (torchcodec on Colab, PyAV everywhere).
WORKING_BACKENDS = ["pyav"] + (["torchcodec"] if video._torchcodec_available() else [])


def solid_frames(palette: np.ndarray = PALETTE) -> np.ndarray:
    return np.broadcast_to(palette[:, None, None, :], (len(palette), HEIGHT, WIDTH, 3)).copy()


def assert_frames_are(decoded: np.ndarray, expected_indices) -> None:
    """Each decoded frame is closest to, and within tolerance of, the palette colour of its index."""
    means = decoded.reshape(len(decoded), -1, 3).astype(float).mean(axis=1)  # [T, 3]
    distance = np.abs(means[:, None, :] - PALETTE[None].astype(float)).mean(axis=2)  # [T, palette]
    np.testing.assert_array_equal(distance.argmin(axis=1), expected_indices)
    expected = solid_frames()[np.asarray(expected_indices)].astype(int)
    per_frame = np.abs(decoded.astype(int) - expected).mean(axis=(1, 2, 3))
    assert per_frame.max() < MAX_MEAN_ABS_DIFF, per_frame


def write_mkv(path, frames: np.ndarray, fps: float) -> None:
    """Matroska stores no frame count, so readers must count the frames themselves."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    distances = np.abs(PALETTE[:, None].astype(int) - PALETTE[None].astype(int)).mean(axis=2)
    assert distances[~np.eye(NUM_FRAMES, dtype=bool)].min() > 2 * MAX_MEAN_ABS_DIFF  # nearest colour is unambiguous
    return write_video(tmp_path_factory.mktemp("clips") / "colours.mp4", solid_frames(), FPS)


# --- writing ------------------------------------------------------------------------------------


def textured_frames(count: int = 32) -> np.ndarray:
    """A panning noise texture with per-frame noise, a subtitle bar and a picture needle: flat colours encode
    the same whatever the encoder's hidden state, these frames do not (x264's defaults give several files)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT, WIDTH + count, 3)).astype(np.int16)
    texture = (texture + np.roll(texture, 1, 1) + np.roll(texture, 1, 0)) // 3
    frames = np.stack([texture[:, t:t + WIDTH] for t in range(count)])
    frames = np.clip(frames + rng.integers(-12, 13, frames.shape), 0, 255).astype(np.uint8)
    frames[:, 36:44, 8:56] = 255  # subtitle bar with dark strokes
    frames[:, 38:42, 10:54:4] = 0
    frames[count // 3:count // 3 + 6, 8:24, 40:56] = (220, 40, 40)  # the needle picture
    return frames


# What fresh heap memory holds (glibc's MALLOC_PERTURB_): with x264's defaults, 85 and 170 give different bytes
# (where x264 runs its AVX-512 code; docs/video.md).
WRITE_IN_CHILD = ("import sys, numpy as np; from duokit.data.video import write_video; "
                  "write_video(sys.argv[2], np.load(sys.argv[1]), float(sys.argv[3]))")
PACKAGE_ROOT = str(Path(video.__file__).resolve().parents[2])  # the children import this duokit


def test_write_video_is_byte_identical_in_and_across_processes(tmp_path):
    frames = textured_frames()
    paths = [write_video(tmp_path / f"{i}.mp4", frames, FPS) for i in range(3)]
    np.save(tmp_path / "frames.npy", frames)
    for perturb in ("85", "170"):
        paths.append(tmp_path / f"child{perturb}.mp4")
        env = {**os.environ, "MALLOC_PERTURB_": perturb, "OMP_NUM_THREADS": "1", "PYTHONPATH": PACKAGE_ROOT}
        subprocess.run([sys.executable, "-c", WRITE_IN_CHILD, str(tmp_path / "frames.npy"), str(paths[-1]),
                        str(FPS)], check=True, env=env)
    assert len({p.read_bytes() for p in paths}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["frames.npy"])
    needle = load_frames(paths[0], backend="pyav").frames[len(frames) // 3, 8:24, 40:56]  # survives crf 18
    assert np.abs(needle.reshape(-1, 3).mean(axis=0) - (220, 40, 40)).max() < MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((2, 47, 64, 3), np.uint8), "even height and width"),
        (np.zeros((2, 48, 63, 3), np.uint8), "even height and width"),
        (np.zeros((2, 48, 64, 3), np.float32), "uint8"),
        (np.zeros((2, 48, 64), np.uint8), "uint8"),
        (np.zeros((0, 48, 64, 3), np.uint8), "non-empty"),
    ],
)
def test_write_video_rejects_bad_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / "bad.mp4", frames, FPS)
    assert not any(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_video(tmp_path / "clip.mp4", solid_frames(), FPS)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(target, solid_frames()[::-1].copy(), FPS)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


# --- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_round_trip_all_frames(clip, backend):
    loaded = load_frames(clip, backend=backend)
    assert loaded.frames.dtype == np.uint8 and loaded.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert (loaded.total_frames, loaded.fps, loaded.duration, loaded.backend) == (24, 12.0, 2.0, backend)
    np.testing.assert_array_equal(loaded.indices, np.arange(NUM_FRAMES))
    np.testing.assert_allclose(loaded.timestamps, np.arange(NUM_FRAMES) / FPS, atol=1e-9)
    assert_frames_are(loaded.frames, np.arange(NUM_FRAMES))


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_uniform_sampling_is_the_official_rule(clip, backend):
    loaded = load_frames(clip, num_frames=5, backend=backend)
    np.testing.assert_array_equal(loaded.indices, [0, 5, 11, 17, 23])  # linspace(0, 23, 5) truncated
    np.testing.assert_array_equal(loaded.indices, np.linspace(0, NUM_FRAMES - 1, 5, dtype=int))
    np.testing.assert_allclose(loaded.timestamps, loaded.indices / FPS, atol=1e-9)
    assert_frames_are(loaded.frames, loaded.indices)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_more_frames_than_the_video_repeats_indices(clip, backend):
    loaded = load_frames(clip, num_frames=30, backend=backend)
    np.testing.assert_array_equal(loaded.indices, np.linspace(0, NUM_FRAMES - 1, 30, dtype=int))
    assert len(loaded.frames) == 30 and len(np.unique(loaded.indices)) == NUM_FRAMES
    assert_frames_are(loaded.frames, loaded.indices)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_fps_sampling_takes_every_kth_frame(clip, backend):
    loaded = load_frames(clip, fps=3, backend=backend)  # 12 fps source -> every 4th frame
    np.testing.assert_array_equal(loaded.indices, [0, 4, 8, 12, 16, 20])
    np.testing.assert_allclose(loaded.timestamps, [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3], atol=1e-9)
    assert_frames_are(loaded.frames, loaded.indices)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_fps_above_the_source_rate_raises(clip, backend):
    with pytest.raises(VideoError, match=rf"{clip.name}.*fps <= 12"):
        load_frames(clip, fps=30, backend=backend)


def test_num_frames_and_fps_together_raise(clip):
    with pytest.raises(ValueError, match="not both"):
        load_frames(clip, num_frames=4, fps=2)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_container_without_frame_count_is_counted(tmp_path, backend):
    path = tmp_path / "colours.mkv"
    write_mkv(path, solid_frames(), FPS)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the case under test
    loaded = load_frames(path, num_frames=4, backend=backend)
    assert loaded.total_frames == NUM_FRAMES
    np.testing.assert_array_equal(loaded.indices, [0, 7, 15, 23])
    assert_frames_are(loaded.frames, loaded.indices)


def test_over_reported_frame_count_resamples_over_real_frames(tmp_path, monkeypatch):
    path = tmp_path / "colours.mkv"
    write_mkv(path, solid_frames(), FPS)
    monkeypatch.setattr(video, "_count_packets", lambda container, stream: 40)
    loaded = load_frames(path, num_frames=4, backend="pyav")
    assert loaded.total_frames == NUM_FRAMES
    np.testing.assert_array_equal(loaded.indices, [0, 7, 15, 23])
    assert_frames_are(loaded.frames, loaded.indices)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_missing_file_raises_naming_it(tmp_path, backend):
    with pytest.raises(VideoError, match="nowhere.mp4: video file not found"):
        load_frames(tmp_path / "nowhere.mp4", backend=backend)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b""])
def test_corrupt_file_raises_naming_it(tmp_path, content, backend):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match="broken.mp4: .*cannot decode"):
        load_frames(path, num_frames=4, backend=backend)


@pytest.mark.parametrize("backend", WORKING_BACKENDS)
def test_truncated_download_raises_naming_it(tmp_path, clip, backend):
    path = tmp_path / "half.mp4"
    path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(VideoError, match="half.mp4: .*cannot decode"):
        load_frames(path, num_frames=4, backend=backend)


def test_unknown_backend_raises(clip):
    with pytest.raises(ValueError, match="backend must be one of"):
        load_frames(clip, backend="decord")


def test_auto_falls_back_to_pyav_when_torchcodec_fails(clip, monkeypatch):
    def failing(*args):
        raise RuntimeError("Could not load libtorchcodec")

    monkeypatch.setattr(video, "_torchcodec_available", lambda: True)
    monkeypatch.setattr(video, "_decode_torchcodec", failing)
    with pytest.warns(UserWarning, match="torchcodec failed"):
        loaded = load_frames(clip, num_frames=3)
    assert loaded.backend == "pyav"
    assert_frames_are(loaded.frames, [0, 11, 23])


def test_explicit_torchcodec_without_torchcodec_raises(clip, monkeypatch):
    monkeypatch.setattr(video, "_torchcodec_available", lambda: False)
    with pytest.raises(VideoError, match="torchcodec does not load"):
        load_frames(clip, backend="torchcodec")


@pytest.mark.skipif(not video._torchcodec_available(), reason="torchcodec does not load here")
def test_torchcodec_matches_pyav(clip):
    codec = load_frames(clip, num_frames=7, backend="torchcodec")
    reference = load_frames(clip, num_frames=7, backend="pyav")
    assert codec.backend == "torchcodec"
    np.testing.assert_array_equal(codec.indices, reference.indices)
    np.testing.assert_allclose(codec.timestamps, reference.timestamps, atol=1e-6)
    assert (codec.total_frames, codec.fps, codec.duration) == (24, 12.0, 2.0)
    assert np.abs(codec.frames.astype(int) - reference.frames.astype(int)).max() <= 2
    assert_frames_are(codec.frames, codec.indices)


# --- needle coverage ----------------------------------------------------------------------------


def test_needle_coverage_hand_computed():
    coverage = needle_coverage([1.0, 3.5, 4.0, 6.5], [0, 2, 4, 6, 8], needle_seconds=1.5)
    # windows [1, 2.5) -> {2}; [3.5, 5) -> {4}; [4, 5.5) -> {4} (start is inside); [6.5, 8) -> {} (end is not)
    assert coverage.frames_per_needle == (1, 1, 1, 0)
    assert coverage.missed == (3,)
    assert not coverage.fully_covered
    assert needle_coverage([1.0, 5.0], [0, 2, 4, 6], needle_seconds=2.0).frames_per_needle == (1, 1)
    assert needle_coverage([], [0, 1]).fully_covered  # nothing to see, nothing missed


def test_needle_coverage_ignores_float_rounding_at_the_edges():
    # A needle placed at frame 3 of a 10 fps video starts at 0.1 * 3 = 0.30000000000000004 s;
    # the frame at 0.3 s is its first frame.
    assert needle_coverage([0.1 * 3], [0.3], needle_seconds=1.5).frames_per_needle == (1,)
    # A 1.5 s needle at frame 14 of a 30 fps video covers frames 14..58; frame 59 is at
    # 59 / 30 = 1.9666666666666666 s, below 14 / 30 + 1.5 = 1.9666666666666668, yet outside it.
    assert needle_coverage([14 / 30], [58 / 30, 59 / 30], needle_seconds=1.5).frames_per_needle == (1,)


def test_coverage_report_hand_computed():
    # 10 s at 1 fps -> frames 0..9; 4 uniform frames -> indices [0, 3, 6, 9] at 0, 3, 6, 9 s.
    report = coverage_report([[1.0], [2.0], [5.0, 8.5]], [10, 10, 10], num_frames=4, needle_seconds=1.5, fps=1)
    assert report == {
        "num_frames": 4, "needle_seconds": 1.5, "assumed_fps": 1, "n_samples": 3, "n_fully_covered": 2,
        "fully_covered_share": 2 / 3, "n_needles": 4, "n_needles_missed": 1,
    }
    # 9.6 s at 1 fps rounds to 10 frames, so the last sampled frame is at 9 s and sees a needle at 8.5 s.
    assert coverage_report([[8.5]], [9.6], num_frames=4, fps=1)["n_fully_covered"] == 1
    # At the default 30 fps the 4 frames sit at 0, 99/30, 199/30, 299/30 s: a 0.2 s needle at 3.2 s is seen.
    assert coverage_report([[3.2]], [10], num_frames=4, needle_seconds=0.2)["n_fully_covered"] == 1
    assert coverage_report([[3.2]], [10], num_frames=4, needle_seconds=0.2, fps=1)["n_fully_covered"] == 0


def test_coverage_report_rejects_bad_input():
    with pytest.raises(ValueError, match="one length per sample"):
        coverage_report([[1.0], [2.0]], [10], num_frames=4)
    with pytest.raises(ValueError, match="no samples"):
        coverage_report([], [], num_frames=4)


def test_coverage_report_timestamps_match_decoding(tmp_path):
    """The no-decode assumption (frame i at i / fps, official uniform rule) is what load_frames returns."""
    fps, seconds, budget = 30, 3, 7
    frames = np.zeros((fps * seconds, 16, 16, 3), np.uint8)
    loaded = load_frames(write_video(tmp_path / "three_seconds.mp4", frames, fps), num_frames=budget)
    np.testing.assert_allclose(loaded.timestamps, uniform_indices(fps * seconds, budget) / fps, atol=1e-9)
    # Needles alternately start 0.1 s before a sampled frame (seen) and 0.01 s after one (missed:
    # frames are 3/7 s apart, more than the 0.3 s needle).
    needles = [[float(t) + (-0.1 if i % 2 == 0 else 0.01)] for i, t in enumerate(loaded.timestamps)]
    decoded = [needle_coverage(n, loaded.timestamps, needle_seconds=0.3).fully_covered for n in needles]
    assert decoded == [i % 2 == 0 for i in range(budget)]
    report = coverage_report(needles, [seconds] * budget, num_frames=budget, needle_seconds=0.3, fps=fps)
    assert report["n_fully_covered"] == sum(decoded) == 4
