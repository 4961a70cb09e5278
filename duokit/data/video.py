"""Video frames in and out: H.264 writing, uniform/fps frame sampling, and needle coverage.

Kit code downstream takes pre-decoded uint8 [T, H, W, 3] frames plus their timestamps; this module
is the only place that touches a decoder (torchcodec, else PyAV; docs/video.md).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np

from duokit.io import atomic_output

BACKENDS = ("auto", "torchcodec", "pyav")

# A VNBench needle lasts about 1-2 s (docs/synth.md); 1.5 s is the middle of that range.
NEEDLE_SECONDS = 1.5

# Frame rate assumed by `coverage_report`, which never opens a video. VNBench haystacks come from
# ActivityNet, MSR-VTT and NExT (VNBench paper, arXiv:2406.09367), mostly ~30 fps; the exact value moves each sampled
# timestamp by under one source frame (1/30 s), small next to a 1.5 s needle.
ASSUMED_FPS = 30.0


class VideoError(ValueError):
    """A video file is missing, unreadable, or cannot give the frames asked for."""


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise and fail
class VideoFrames:
    """Sampled frames of one video and where they sit in it."""

    frames: np.ndarray  # uint8 [T, H, W, 3], RGB
    timestamps: np.ndarray  # float64 [T], presentation time of each sampled frame, seconds
    fps: float  # source frame rate
    total_frames: int  # frames in the source video
    duration: float  # total_frames / fps, seconds
    indices: np.ndarray  # int64 [T], source frame index of each sampled frame
    backend: str  # "torchcodec" or "pyav"


# ---------------------------------------------------------------------------------------------
# Writing


# x264 options under which the output depends on the frames alone (docs/video.md). With B-frames on
# (x264's default: 3), the same frames encoded single-threaded still gave a different file on each write:
# x264's B-frame macroblock-tree path reads heap memory it never wrote. glibc's MALLOC_PERTURB_, which fixes
# what fresh heap memory holds, fixes the output and changes it with its value; the read is in x264's
# AVX-512 code (limited to AVX2 code, `asm=AVX2`, or without asm, the output is fixed). bframes=0 removes it
# at no measured cost (benchmarks/video_determinism.py). mbtree=0 removes it too and also gives the same
# bytes with AVX2 and AVX-512 code, but costs ~1.5x encode time and 1.4-4.6x file size at crf 18.
DETERMINISTIC_X264_PARAMS = "bframes=0"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18,
                x264_params: str = DETERMINISTIC_X264_PARAMS) -> Path:
    """Encode uint8 RGB frames [T, H, W, 3] as an H.264 (yuv420p) mp4 at `path`, atomically.

    H and W must be even (yuv420p halves the chroma planes); odd sizes raise instead of being padded
    silently, so a loaded clip always has the shape that was written. `crf` 18 keeps burned-in
    subtitle needles legible (x264's default is 23). The same frames give byte-identical files in one
    process and across processes on one machine: the encoder runs single-threaded (x264's output changes
    with its thread count, which by default follows the CPU count: 1, 2 and 4 threads give three
    different files) and with `x264_params` (default `DETERMINISTIC_X264_PARAMS`, no B-frames; "" gives
    x264's defaults, which are not deterministic). x264 picks its SIMD code by CPU: with the default,
    CPUs with and without AVX-512 write different bytes; `x264_params="mbtree=0"` makes those agree
    (docs/video.md). Bytes can also differ between PyAV/FFmpeg/x264 versions (the mp4 and x264 headers
    name the encoder version).
    """
    import av

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            f"write_video({path}): frames must be a non-empty uint8 array [T, H, W, 3]; "
            f"got dtype {frames.dtype}, shape {frames.shape}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(
            f"write_video({path}): H.264 yuv420p needs even height and width, got {height}x{width}; "
            "crop or pad the frames by one pixel"
        )
    if not fps > 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")

    with atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), **({"x264-params": x264_params} if x264_params else {})}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


# ---------------------------------------------------------------------------------------------
# Sampling rules


def uniform_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """The official VNBench rule (LLaVA example of github.com/joez17/VideoNIAH): `np.linspace(0, N-1, n, dtype=int)`.

    With more frames asked than the video has, indices repeat (as the official code does), so the
    model always sees `num_frames` frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).astype(np.int64)


def sampled_fps(timestamps: np.ndarray, source_fps: float) -> float:
    """Frames per video second of uniformly sampled frames (the source fps for a single frame)."""
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        return (len(timestamps) - 1) / float(timestamps[-1] - timestamps[0])
    return float(source_fps)


def fps_indices(total_frames: int, source_fps: float, fps: float) -> np.ndarray:
    """One frame every source_fps/fps frames: transformers' `default_sample_indices_fn` rule
    (`transformers/video_utils.py`), `n = max(1, int(total / source_fps * fps))`, `i * total // n`."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    count = max(1, int(total_frames / source_fps * fps))
    if count > total_frames:
        raise ValueError(f"fps={fps} asks for {count} frames but the video has {total_frames} "
                         f"(source fps {source_fps:g}); ask for fps <= {source_fps:g}")
    return np.arange(count, dtype=np.int64) * total_frames // count


def _sample_indices(path: Path, total_frames: int, source_fps: float, num_frames: int | None,
                    fps: float | None) -> np.ndarray:
    try:
        if num_frames is not None:
            return uniform_indices(total_frames, num_frames)
        if fps is not None:
            return fps_indices(total_frames, source_fps, fps)
    except ValueError as err:
        raise VideoError(f"{path}: {err}") from err
    return np.arange(total_frames, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Reading


def load_frames(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str = "auto",
) -> VideoFrames:
    """Decode the frames of `path` picked by `num_frames` (uniform) or `fps`, or all frames.

    backend "auto" uses torchcodec when it imports and decodes this file, else PyAV.
    """
    path = Path(path)
    if num_frames is not None and fps is not None:
        raise ValueError(f"load_frames({path}): give num_frames or fps, not both")
    if backend not in BACKENDS:
        raise ValueError(f"load_frames({path}): backend must be one of {BACKENDS}, got {backend!r}")
    if not path.is_file():
        raise VideoError(f"{path}: video file not found; check the path or fetch the data first")

    if backend != "pyav" and _torchcodec_available():
        try:
            return _decode_torchcodec(path, num_frames, fps)
        except VideoError:
            raise
        except Exception as err:  # torchcodec raises RuntimeError, ValueError and OSError alike
            if backend == "torchcodec":
                raise VideoError(f"{path}: torchcodec cannot decode this video ({err}); "
                                 "try backend='pyav'") from err
            # A torchcodec that loads but fails on this file must not stop a run: PyAV can still decode.
            warnings.warn(f"torchcodec failed on {path} ({err}); decoding with PyAV", stacklevel=2)
    elif backend == "torchcodec":
        raise VideoError(f"{path}: backend='torchcodec' asked but torchcodec does not load here; "
                         "use backend='pyav' or 'auto'")
    return _decode_pyav(path, num_frames, fps)


def frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the frames of `path`, read from the container header (nothing is decoded, so
    sizing a whole annotation set takes milliseconds a video); a header without a size decodes one frame."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found; check the path or fetch the data first")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream in this file")
            context = container.streams.video[0].codec_context
            if context.height and context.width:
                return int(context.height), int(context.width)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot read this video's header ({err}); the file is corrupt or not a "
                         "video, re-download or re-create it") from err
    frame = load_frames(path, num_frames=1).frames[0]
    return frame.shape[0], frame.shape[1]


@cache
def _torchcodec_available() -> bool:
    # torchcodec imports fine but fails to load its library when no system FFmpeg 4-9 is present
    # (https://github.com/pytorch/torchcodec), so loading the decoder module is the real test.
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError/OSError from its FFmpeg libraries
        return False
    return True


def _decode_torchcodec(path: Path, num_frames: int | None, fps: float | None) -> VideoFrames:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path), seek_mode="exact")
    total, source_fps = decoder.metadata.num_frames, decoder.metadata.average_fps
    if not total or not source_fps:
        raise VideoError(f"{path}: torchcodec reports no frames or no frame rate")
    indices = _sample_indices(path, total, source_fps, num_frames, fps)
    batch = decoder.get_frames_at(indices=indices.tolist())
    return VideoFrames(
        frames=batch.data.permute(0, 2, 3, 1).contiguous().numpy(),  # torchcodec gives [N, 3, H, W]
        timestamps=batch.pts_seconds.double().numpy(),
        fps=float(source_fps), total_frames=int(total), duration=total / source_fps,
        indices=indices, backend="torchcodec",
    )


def _decode_pyav(path: Path, num_frames: int | None, fps: float | None) -> VideoFrames:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-threaded decoding gives the same pixels, faster
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"{path}: the container reports no frame rate")
            source_fps = float(rate)
            total = stream.frames or _count_packets(container, stream)
            if total == 0:
                raise VideoError(f"{path}: the video stream has no frames")
            indices = _sample_indices(path, total, source_fps, num_frames, fps)
            decoded, found = _decode_wanted(container, stream, indices)
            if found == 0:
                raise VideoError(f"{path}: no frame of this video decodes; re-download or re-create it")
            if found <= indices[-1]:
                # The container over-reported its frame count: re-sample over the frames that exist.
                total = found
                indices = _sample_indices(path, total, source_fps, num_frames, fps)
                container.seek(0, stream=stream)
                decoded, _ = _decode_wanted(container, stream, indices)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot decode this video ({err}); the file is corrupt or not a video, "
                         "re-download or re-create it") from err

    frames = np.stack([decoded[i][0] for i in indices])
    timestamps = np.array([decoded[i][1] if decoded[i][1] is not None else i / source_fps for i in indices])
    return VideoFrames(frames=frames, timestamps=timestamps.astype(np.float64), fps=source_fps,
                       total_frames=int(total), duration=total / source_fps, indices=indices, backend="pyav")


def _count_packets(container, stream) -> int:
    """Frame count for containers that do not store one (e.g. mkv/webm): demux without decoding."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0, stream=stream)
    return count


def _decode_wanted(container, stream, indices: np.ndarray) -> tuple[dict, int]:
    """Decode sequentially once, converting only wanted frames to RGB; stop after the last wanted one.

    Returns {index: (rgb array, time or None)} and how many frames were decoded.
    """
    wanted, last = set(indices.tolist()), int(indices[-1])
    decoded, count = {}, 0
    for count, frame in enumerate(container.decode(stream), start=1):
        index = count - 1
        if index in wanted:
            decoded[index] = (frame.to_ndarray(format="rgb24"), frame.time)
        if index == last:
            break
    return decoded, count


# ---------------------------------------------------------------------------------------------
# Needle coverage

# Slack on the needle window edges so a frame whose float timestamp lands an ulp off a needle's
# start or end is judged by the frame it is, not by rounding.
_TIME_SLACK_S = 1e-6


@dataclass(frozen=True)
class NeedleCoverage:
    """How the sampled frames of one sample fall on its needles."""

    needle_time: tuple[float, ...]  # needle start times, seconds
    frames_per_needle: tuple[int, ...]  # sampled frames inside each needle's window
    missed: tuple[int, ...]  # positions (in needle_time) of needles no sampled frame sees

    @property
    def fully_covered(self) -> bool:
        """Every needle is seen by at least one sampled frame: only then can the answer be in the frames."""
        return not self.missed


def needle_coverage(needle_time, timestamps, needle_seconds: float = NEEDLE_SECONDS) -> NeedleCoverage:
    """Count the sampled frames inside each needle window [start, start + needle_seconds)."""
    times = np.asarray(timestamps, dtype=np.float64)
    counts = []
    for start in needle_time:
        inside = (times >= start - _TIME_SLACK_S) & (times < start + needle_seconds - _TIME_SLACK_S)
        counts.append(int(inside.sum()))
    return NeedleCoverage(
        needle_time=tuple(float(t) for t in needle_time),
        frames_per_needle=tuple(counts),
        missed=tuple(i for i, count in enumerate(counts) if count == 0),
    )


def coverage_report(
    samples_needle_times,
    lengths,
    num_frames: int,
    needle_seconds: float = NEEDLE_SECONDS,
    fps: float = ASSUMED_FPS,
) -> dict:
    """Share of samples whose every needle is seen by `num_frames` uniformly sampled frames, without decoding.

    Each video is taken to be `length` seconds at `fps` frames per second (VNBench's `length` field,
    presumably seconds), i.e. round(length * fps) frames, sampled by the official
    uniform rule; frame i sits at i / fps. An answer needs every needle seen, so this share bounds
    the 4-try accuracy a model can reach with this frame budget (up to guessing).
    """
    samples_needle_times, lengths = list(samples_needle_times), list(lengths)
    if len(samples_needle_times) != len(lengths):
        raise ValueError(f"coverage_report: {len(samples_needle_times)} needle_time lists but "
                         f"{len(lengths)} lengths; give one length per sample")
    if not lengths:
        raise ValueError("coverage_report: no samples given")
    fully_covered = needles = needles_missed = 0
    for needle_time, length in zip(samples_needle_times, lengths):
        total = max(1, round(length * fps))
        timestamps = uniform_indices(total, num_frames) / fps
        coverage = needle_coverage(needle_time, timestamps, needle_seconds)
        fully_covered += coverage.fully_covered
        needles += len(coverage.needle_time)
        needles_missed += len(coverage.missed)
    return {
        "num_frames": num_frames,
        "needle_seconds": needle_seconds,
        "assumed_fps": fps,
        "n_samples": len(lengths),
        "n_fully_covered": fully_covered,
        "fully_covered_share": fully_covered / len(lengths),
        "n_needles": needles,
        "n_needles_missed": needles_missed,
    }
