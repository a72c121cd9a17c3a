"""Molmo2 videos (frames as numpy arrays) -> sampled frames, patches, pooling tables, grids and frame
times, equal to transformers' `Molmo2VideoProcessor` (docs/architecture.md#molmo2-preprocessing).

Each sampled frame is one view resized to crop_size x crop_size like an image's low-res view, but
pooled 3x3 (81 tokens per frame at 378 px) instead of 2x2. One video gives
  pixel_values   float32 [T, P, patch*patch*3]
  token_pooling  int64 [T * tokens_per_frame, pool_h*pool_w], relative to the video's first patch
  grid           (T, rows, cols)
  timestamps     seconds of each sampled frame (frame index / fps), written before the frame's tokens
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from molmo_jax.preprocess.molmo2_image import as_rgb, check_view, global_views, pool_windows
from molmo_jax.preprocess.resize import F32


@dataclasses.dataclass(frozen=True)
class Molmo2VideoSettings:
    """Molmo2VideoProcessor's options; the defaults are the released models'."""
    crop_size: int = 378
    patch: int = 14
    pooling: tuple[int, int] = (3, 3)
    num_frames: int = 64          # at most this many frames are sampled
    max_fps: float = 2.0          # ... and at most this many per second of video
    do_sample_frames: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        check_view(self)
        if self.num_frames < 1 or not self.max_fps > 0:
            raise ValueError(f"num_frames must be >= 1 and max_fps > 0, got {self.num_frames} and {self.max_fps}")

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch


@dataclasses.dataclass
class VideoMetadata:
    """What is known of the video the frames come from (transformers' `VideoMetadata` fields).
    fps: frames per second of the given frames (None: assumed to be the sampling rate, max_fps by default);
    frames_indices: the frames' indices in the video, for unsampled frames (default 0..n-1)."""
    total_num_frames: int
    fps: float | None = None
    duration: float | None = None
    frames_indices: list[int] | None = None

    @classmethod
    def from_any(cls, metadata, n_frames: int, what: str) -> "VideoMetadata":
        if metadata is None:
            return cls(total_num_frames=n_frames)
        if isinstance(metadata, cls):
            metadata = dataclasses.asdict(metadata)
        if not isinstance(metadata, dict):
            raise ValueError(f"{what}: video_metadata must be a dict or VideoMetadata, got {type(metadata).__name__}")
        unknown = sorted(set(metadata) - {f.name for f in dataclasses.fields(cls)} - {"height", "width"})
        if unknown:
            raise ValueError(f"{what}: unknown video_metadata keys {unknown}")
        out = cls(**{k: v for k, v in metadata.items() if k not in ("height", "width")})
        if out.total_num_frames != n_frames:
            raise ValueError(f"{what}: video_metadata says {out.total_num_frames} frames but {n_frames} were given")
        return out


def sample_frames(meta: VideoMetadata, s: Molmo2VideoSettings, num_frames: int | None = None,
                  fps: float | None = None) -> np.ndarray:
    """Indices of the frames to keep: `fps` frames per second if given, else up to `num_frames`
    (s.num_frames) limited to s.max_fps per second; evenly spaced by total / count, truncated from float32
    as the reference's torch.arange(...).int(). Sets meta.fps / meta.duration when unknown. Where rounding
    makes that arange one step longer (150 frames, 7 wanted) the reference fails indexing past the last
    frame; that extra index is dropped here."""
    if fps is not None and num_frames is not None:
        raise ValueError("num_frames and fps are mutually exclusive: pass at most one")
    if meta.fps is None:
        meta.fps = fps if fps is not None else s.max_fps
    if meta.duration is None:
        meta.duration = meta.total_num_frames / meta.fps
    if fps is not None:
        target = int(meta.duration * fps)
    else:
        target = num_frames if num_frames is not None else s.num_frames
        if meta.fps > s.max_fps:
            target = min(target, int(meta.duration * s.max_fps))
    total = meta.total_num_frames
    target = max(min(target, total), 1)
    step = total / target
    count = int(np.ceil(total / step))
    indices = (np.arange(count, dtype=np.float64) * step).astype(F32).astype(np.int32)
    return indices[indices < total]


def frame_times(indices, fps: float, float32: bool) -> list[float]:
    """Seconds of each frame, index / fps: in float32 for sampled frames (the reference divides a torch
    int32 tensor), in float64 otherwise (Python ints)."""
    if float32:
        return [float(v) for v in (np.asarray(indices).astype(F32) / F32(fps))]
    return [int(i) / fps for i in indices]


@functools.lru_cache(maxsize=16)
def frame_pooling(s: Molmo2VideoSettings) -> tuple[np.ndarray, int, int]:
    """(pooling windows of one frame's patches, rows, cols), shared by every frame (cached)."""
    cp = s.crop_patches
    windows, rows, cols = pool_windows(np.arange(cp * cp, dtype=np.int64).reshape(cp, cp), *s.pooling)
    windows.setflags(write=False)
    return windows, rows, cols


@dataclasses.dataclass
class Molmo2VideoInputs:
    pixel_values: np.ndarray    # float32 [T, P, patch*patch*3]
    token_pooling: np.ndarray   # int64 [T * rows * cols, pool_h*pool_w], relative to this video's patches
    grid: tuple[int, int, int]  # (T, rows, cols)
    timestamps: list[float]
    frames_indices: list[int]


def as_frames(video, what: str = "video") -> np.ndarray:
    """uint8 [T, H, W, 3] from a [T, H, W, C] array or a non-empty list of same-shaped frames."""
    if isinstance(video, np.ndarray) and video.ndim == 4:
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise ValueError(f"{what}: expected a list of frames or a [T, H, W, 3] array, got "
                         f"{type(video).__name__}{list(getattr(video, 'shape', []))}")
    if not frames:
        raise ValueError(f"{what}: no frames")
    rgb = [as_rgb(f, f"{what} frame {k}") for k, f in enumerate(frames)]
    shapes = sorted({f.shape for f in rgb})
    if len(shapes) > 1:
        raise ValueError(f"{what}: frames differ in size ({', '.join(str(list(sh[:2])) for sh in shapes)})")
    return np.stack(rgb)


def process_video(video, s: Molmo2VideoSettings, metadata=None, *, do_sample_frames: bool | None = None,
                  num_frames: int | None = None, fps: float | None = None, what: str = "video") -> Molmo2VideoInputs:
    """One video -> sampled frames' patches, pooling table, grid and frame times."""
    frames = as_frames(video, what)
    meta = VideoMetadata.from_any(metadata, frames.shape[0], what)
    sample = s.do_sample_frames if do_sample_frames is None else do_sample_frames
    if sample:
        indices = sample_frames(meta, s, num_frames=num_frames, fps=fps)
        frames = frames[indices]
        times = frame_times(indices, meta.fps, float32=True)
    else:
        indices = list(meta.frames_indices) if meta.frames_indices is not None else list(range(frames.shape[0]))
        if len(indices) != frames.shape[0]:
            raise ValueError(f"{what}: {len(indices)} frames_indices for {frames.shape[0]} frames")
        times = frame_times(indices, meta.fps if meta.fps is not None else s.max_fps, float32=False)
    pixel_values = global_views(frames, s)
    windows, rows, cols = frame_pooling(s)
    n, per_frame = pixel_values.shape[:2]
    offsets = (np.arange(n, dtype=np.int64) * per_frame)[:, None, None]
    pooling = np.where(windows[None] >= 0, windows[None] + offsets, -1).reshape(-1, windows.shape[1])
    return Molmo2VideoInputs(pixel_values=pixel_values, token_pooling=pooling, grid=(n, rows, cols),
                             timestamps=times, frames_indices=[int(i) for i in indices])


def process_videos(videos, s: Molmo2VideoSettings, video_metadata=None, **sampling) -> tuple[dict, list]:
    """Several videos -> (pixel_values_videos, video_token_pooling, video_grids) under the transformers
    names, and the per-video results. A single video may be passed bare (an array or a list of frames)."""
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    elif isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], np.ndarray) and videos[0].ndim == 3:
        videos = [videos]
    videos = list(videos) if isinstance(videos, (list, tuple)) else videos
    if not isinstance(videos, list) or not videos:
        raise ValueError("videos: expected a video (frames) or a list of videos, got "
                         + ("an empty list" if isinstance(videos, list) else type(videos).__name__))
    metas = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(videos)
    if len(metas) != len(videos):
        raise ValueError(f"videos: {len(videos)} videos but {len(metas)} video_metadata entries")
    per_video = [process_video(v, s, m, what=f"video {k + 1} of {len(videos)}", **sampling)
                 for k, (v, m) in enumerate(zip(videos, metas))]
    pooled, offset = [], 0
    for item in per_video:
        pooled.append(np.where(item.token_pooling >= 0, item.token_pooling + offset, -1))
        offset += item.pixel_values.shape[0] * item.pixel_values.shape[1]
    arrays = {
        "pixel_values_videos": np.concatenate([item.pixel_values for item in per_video]),
        "video_token_pooling": np.concatenate(pooled),
        "video_grids": np.array([item.grid for item in per_video], np.int64),
    }
    return arrays, per_video
