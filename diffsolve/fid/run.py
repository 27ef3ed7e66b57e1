"""Sharded, resumable FID/KID evaluation, on one process or across a torchrun group.

The samples ``0 … num−1`` (sample i generated from seed ``seed_start + i``, or the i-th PNG of a folder in
name order) are cut into shards of ``shard_size`` consecutive indices. Each shard is generated and turned
into features in batches of ``batch_size`` *within the shard*, so what is computed for a shard never depends
on which process computes it, nor on what else runs. A finished shard's features are written atomically to
``workdir/shards/NNNNNN.npz`` with a SHA-256 of its contents; a rerun skips the valid ones and redoes the
missing, partial or corrupt ones. ``workdir/settings.json`` records everything the features depend on; a
workdir made with other settings is refused.

Under torchrun (``WORLD_SIZE`` > 1; gloo on the CPU, nccl on GPUs) rank r takes the shards s with
s mod world = r; the workdir must be on a file system all ranks share. Rank 0 then reads every shard in
index order and computes the statistics, so the result is the same as a single process's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import atomic_write
from .features import FeatureExtractor, file_digest, get_extractor, to_uint8
from .stats import Statistics, kid

WORKDIR_FORMAT = "diffsolve-fid-workdir-v1"
_GREY_MODES, _COLOUR_MODES = {"L", "LA", "1"}, {"RGB", "RGBA", "P", "CMYK", "YCbCr"}


# ---- distributed ---------------------------------------------------------------------------------------
def init_distributed(timeout_minutes: float | None = None) -> tuple[int, int]:
    """Join the torchrun group when ``WORLD_SIZE`` > 1 (nccl if CUDA is available, else gloo); returns
    ``(rank, world_size)``, ``(0, 1)`` outside torchrun. A rank that finishes its shards waits for the others
    in one collective, up to ``timeout_minutes`` (default ``$DIFFSOLVE_DIST_TIMEOUT_MIN`` or 24 hours)."""
    if timeout_minutes is None:
        timeout_minutes = float(os.environ.get("DIFFSOLVE_DIST_TIMEOUT_MIN", 24 * 60))
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """Every rank's ``obj`` (a list of one element outside torchrun)."""
    import torch.distributed as dist

    _, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None, what: str) -> None:
    """A collective check: raise on every rank if any rank failed (so no rank waits forever for another)."""
    errors = [(r, e) for r, e in enumerate(_gather(error)) if e]
    if errors:
        rank, first = errors[0]
        raise ValueError(f"{what} (rank {rank}): {first}" if _rank_world()[1] > 1 else first)


def _broadcast(obj):
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- atomic files --------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


# ---- image sources -------------------------------------------------------------------------------------
def _model_fingerprint(model: str, scheduler_config: str | None = None) -> str:
    """SHA-256 over the model folder's configs and weights (so a retrained model is a new setting); the
    source string itself for a hub id that is not a local folder. A separate ``scheduler_config`` file is
    hashed in too: the noise schedule decides the samples as much as the weights."""
    from ..loading import SHIPPED

    folder = SHIPPED.get(model, Path(model))
    extra = "" if scheduler_config is None else f"+scheduler:{file_digest(Path(scheduler_config), 16)}"
    if not folder.is_dir():
        return f"id:{model}{extra}"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + file_digest(path, 64).encode())
    return h.hexdigest()[:16] + extra


class ModelSource:
    """Samples of a diffusion model: sample i from seed ``seed_start + i`` (loaded on first use).
    ``scheduler_config``: the path of a scheduler_config.json (or its folder) for a folder holding only a UNet
    (see :func:`~diffsolve.load_model`)."""

    def __init__(self, model: str, sampler: str, steps: int | None, *, options: dict | None = None,
                 seed_start: int = 0, class_label: int | None = None, guidance: float = 1.0,
                 grid: str | None = None, t_end: float | None = None, device: str | None = None,
                 scheduler_config: str | Path | None = None):
        from ..api import check_steps
        from ..registry import get_sampler

        spec = get_sampler(sampler)
        options = dict(options or {})
        spec.check_options(options)
        check_steps(steps, spec.adaptive, spec.name)
        if guidance != 1.0 and class_label is None:
            raise ValueError("--guidance needs --class (guidance mixes the conditional and unconditional predictions)")
        self.model_name, self.sampler, self.steps, self.options = str(model), spec.name, steps, options
        self.seed_start, self.class_label, self.guidance = int(seed_start), class_label, float(guidance)
        self.grid, self.t_end, self.device = grid, t_end, device
        if scheduler_config is not None:  # resolved, so that a resume from another folder finds the same file
            from ..loading import scheduler_config_path

            scheduler_config = str(scheduler_config_path(scheduler_config).resolve())
        self.scheduler_config = scheduler_config
        self._model = None
        # hashed once: the settings must describe the weights that are loaded, even if the files change later
        self.fingerprint = _model_fingerprint(self.model_name, self.scheduler_config)

    def settings(self) -> dict:
        return {"kind": "model", "model": self.model_name, "model_fingerprint": self.fingerprint,
                "sampler": self.sampler, "steps": self.steps, "options": self.options, "seed_start": self.seed_start,
                "class_label": self.class_label, "guidance": self.guidance, "grid": self.grid, "t_end": self.t_end,
                "device_type": torch.device(self.device or "cpu").type,
                # only when given, so that workdirs made before this setting existed still resume
                **({} if self.scheduler_config is None else {"scheduler_config": self.scheduler_config})}

    def available(self) -> int | None:
        return None

    def prepare(self) -> None:
        """Load the model (before timing the first shard)."""
        self.model

    @property
    def model(self):
        if self._model is None:
            from ..loading import load_model

            device = None if torch.device(self.device or "cpu").type == "cpu" else self.device
            model = load_model(self.model_name, scheduler_config=self.scheduler_config, device=device)
            if _model_fingerprint(self.model_name, self.scheduler_config) != self.fingerprint:
                raise ValueError(f"the model files of {self.model_name!r} changed while this run started; run again")
            self._model = model
        return self._model

    def images(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        from ..api import sample

        seeds = list(range(self.seed_start + start, self.seed_start + stop))
        labels = None if self.class_label is None else [self.class_label] * len(seeds)
        x, info = sample(self.model, self.sampler, self.steps, seeds=seeds, class_labels=labels,
                         guidance_scale=self.guidance, grid=self.grid, t_end=self.t_end, return_info=True,
                         **self.options)
        nfe = (info.nfe_per_sample.double().cpu().numpy() if info.nfe_per_sample is not None
               else np.full(len(seeds), float(info.nfe)))
        return to_uint8(x).cpu(), nfe


def _png_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(folder)!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no .png files")
    return files


class FolderSource:
    """The PNGs of a folder in name order; all must have one size. Grey images stay one channel unless the
    folder also holds colour ones (then all are read as RGB). Images are read on the host; the feature
    extractor moves them to its device (so there is no ``device`` argument)."""

    def __init__(self, folder: str | Path):
        from PIL import Image

        self.folder = Path(folder).resolve()
        self.files = _png_files(self.folder)
        sizes, modes = {}, {}
        for path in self.files:
            try:
                with Image.open(path) as im:
                    sizes.setdefault(im.size, path.name)
                    modes.setdefault(im.mode, path.name)
            except Exception as err:
                raise ValueError(f"{path}: not a readable PNG ({type(err).__name__}: {err})") from err
        if len(sizes) > 1:
            listed = ", ".join(f"{w}×{h} (e.g. {name})" for (w, h), name in sorted(sizes.items()))
            raise ValueError(f"{self.folder}: images of mixed sizes: {listed}; FID needs one size")
        unknown = set(modes) - _GREY_MODES - _COLOUR_MODES
        if unknown:
            raise ValueError(f"{self.folder}: unsupported PNG mode(s) {sorted(unknown)} (e.g. {modes[min(unknown)]}); "
                             "expected 8-bit grey or RGB(A)")
        self.mode = "L" if set(modes) <= _GREY_MODES else "RGB"
        (self.size,) = sizes

    def settings(self) -> dict:
        h = hashlib.sha256()
        for path in self.files:
            h.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        return {"kind": "folder", "folder": str(self.folder), "files": len(self.files),
                "listing": h.hexdigest()[:16], "mode": self.mode}

    def available(self) -> int | None:
        return len(self.files)

    def prepare(self) -> None:
        pass

    def images(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        from PIL import Image

        arrays = []
        for path in self.files[start:stop]:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(self.mode))
            arrays.append(arr[..., None] if arr.ndim == 2 else arr)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return x, np.zeros(stop - start)


def data_images(data: str) -> torch.Tensor:
    """``digits`` (the training split), ``digits:train|test|all``, or a folder of PNGs → uint8 (N, C, H, W)."""
    from ..data import digits

    if data == "digits" or data.startswith("digits:"):
        split = data.partition(":")[2] or "train"
        return to_uint8(digits(split)[0])
    source = FolderSource(data)
    return source.images(0, len(source.files))[0]


# ---- shards --------------------------------------------------------------------------------------------
def _shard_digest(features: np.ndarray, nfe: np.ndarray, start: int, stop: int, settings_digest: str) -> str:
    h = hashlib.sha256(f"{start}:{stop}:{settings_digest}:{features.dtype}:{features.shape}".encode())
    h.update(np.ascontiguousarray(features).tobytes())
    h.update(np.ascontiguousarray(nfe, dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass
class Shard:
    index: int
    start: int
    stop: int
    path: Path


def write_shard(shard: Shard, features: np.ndarray, nfe: np.ndarray, seconds: float, settings_digest: str) -> None:
    digest = _shard_digest(features, nfe, shard.start, shard.stop, settings_digest)
    arrays = {"features": features, "nfe": np.asarray(nfe, dtype=np.float64), "start": np.array(shard.start),
              "stop": np.array(shard.stop), "settings": np.array(settings_digest), "digest": np.array(digest),
              "seconds": np.array(float(seconds))}
    atomic_write(shard.path, lambda f: np.savez(f, **arrays))


def read_shard(shard: Shard, dim: int, settings_digest: str) -> tuple[dict | None, str]:
    """``({"features", "nfe", "seconds"}, "")`` for a valid shard file, else ``(None, why)``."""
    if not shard.path.exists():
        return None, "missing"
    try:
        with np.load(shard.path, allow_pickle=False) as z:
            features, nfe, seconds = z["features"], z["nfe"], float(z["seconds"])
            start, stop, settings, digest = int(z["start"]), int(z["stop"]), str(z["settings"]), str(z["digest"])
    except Exception as err:  # truncated / not a zip / bad CRC / missing arrays
        return None, f"unreadable ({type(err).__name__}: {err})"
    n = shard.stop - shard.start
    if (start, stop) != (shard.start, shard.stop) or settings != settings_digest:
        return None, "written for other samples or settings"
    if features.shape != (n, dim) or features.dtype != np.float32 or nfe.shape != (n,):
        return None, f"wrong shape {features.shape} (expected {(n, dim)})"
    if _shard_digest(features, nfe, start, stop, settings_digest) != digest:
        return None, "checksum mismatch (corrupt)"
    return {"features": features, "nfe": nfe, "seconds": seconds}, ""


# ---- the evaluation ------------------------------------------------------------------------------------
@dataclass
class FIDResult:
    fid: float
    kid: float | None
    kid_std: float | None
    kid_subset_size: int | None
    kid_subsets: int
    count: int
    nfe: float | None
    extractor: str
    reference: str
    reference_count: int
    workdir: str
    #: seconds spent generating and extracting, summed over shards (all runs and ranks)
    compute_seconds: float

    def summary(self) -> str:
        kid_txt = ("" if self.kid is None else  # KID is O(1e-3) for close sets: printed ×10³, as papers report it
                   f", KID×10³ {1e3 * self.kid:.4g} ± {1e3 * self.kid_std:.2g} ({self.kid_subsets} subsets of "
                   f"{self.kid_subset_size})")
        nfe_txt = "" if self.nfe is None else f", NFE {self.nfe:g}"
        return (f"FID {self.fid:.6g}{kid_txt}; {self.count} samples{nfe_txt} vs {self.reference_count} reference "
                f"[{self.extractor}]")


@dataclass
class Incomplete:
    """What a run stopped by ``max_shards`` returns: shards done so far and in all."""

    done: int
    total: int
    workdir: str


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _settings_mismatch(old: dict, new: dict) -> str:
    old, new = _flatten(old), _flatten(new)
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _prepare_workdir(workdir: Path, settings: dict) -> None:
    path = workdir / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ({err}); delete the workdir or choose another") from err
        if old != settings:
            raise ValueError(f"workdir {str(workdir)!r} was made with other settings ({_settings_mismatch(old, settings)}); "
                             "use another --workdir, or delete this one to start over")
    else:
        if workdir.exists() and any(p.name != "shards" for p in workdir.iterdir()):
            raise ValueError(f"workdir {str(workdir)!r} exists and is not a diffsolve fid workdir (no settings.json); "
                             "choose an empty or new folder")
        _write_json(path, settings)
    for tmp in (workdir / "shards").glob(".*.tmp"):  # left by a killed writer
        tmp.unlink(missing_ok=True)


def evaluate(source, extractor: FeatureExtractor, reference: Statistics | str | Path, workdir: str | Path, *,
             num: int, shard_size: int = 1000, batch_size: int = 250, max_shards: int | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000, kid_seed: int = 2020,
             log: Callable[[str], None] | None = None, reference_name: str | None = None,
             progress: bool = False) -> FIDResult | Incomplete:
    """Compute FID (and KID) of ``num`` images from ``source`` (:class:`ModelSource` or :class:`FolderSource`)
    against ``reference`` statistics, with shards in ``workdir`` (see the module docstring). Collective under
    torchrun: every rank calls it and every rank gets the result. Returns :class:`Incomplete` when
    ``max_shards`` (per process) stopped it before all shards were done. ``progress``: a bar over this
    process's samples still to do."""
    rank, world = _rank_world()
    log = log or (lambda msg: None)
    if isinstance(reference, (str, Path)):
        reference_name = reference_name or str(reference)
        reference = Statistics.load(reference)
    reference.check_compatible(extractor.id, f"the reference statistics {reference_name or ''}".rstrip())
    if reference.dim != extractor.dim:
        raise ValueError(f"reference statistics have dimension {reference.dim}, the extractor {extractor.dim}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"--num: FID needs at least 2 samples (a covariance), got {num!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard size and batch size must be >= 1 (got {shard_size}, {batch_size})")
    if max_shards is not None and max_shards < 0:
        raise ValueError(f"--max-shards must be >= 0, got {max_shards}")
    available = source.available()
    if available is not None and num > available:
        raise ValueError(f"--num {num}: the folder holds only {available} PNG files")

    workdir = Path(workdir)
    settings = {"format": WORKDIR_FORMAT, "source": source.settings(), "num": num, "shard_size": shard_size,
                "batch_size": batch_size, "features": extractor.id}
    settings = json.loads(json.dumps(settings, default=repr))  # as it reads back from settings.json
    settings_digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    error = None
    if rank == 0:
        try:
            _prepare_workdir(workdir, settings)
        except (ValueError, OSError) as err:
            error = str(err)
    _agree(error, "workdir")

    shards = [Shard(i, s, min(s + shard_size, num), workdir / "shards" / f"{i:06d}.npz")
              for i, s in enumerate(range(0, num, shard_size))]
    mine = [s for s in shards if s.index % world == rank]
    error, done_here = None, 0
    bar = None
    try:
        bar = tqdm(total=sum(s.stop - s.start for s in mine), desc="samples" if world == 1 else f"samples, rank {rank}",
                   unit="sample", disable=not progress, leave=False)
        for shard in mine:
            done, why = read_shard(shard, extractor.dim, settings_digest)
            if done is not None:
                bar.update(shard.stop - shard.start)  # done by an earlier run
                continue
            if why != "missing":
                log(f"shard {shard.index + 1}/{len(shards)}: {why}; redoing it")
            if max_shards is not None and done_here >= max_shards:
                continue
            source.prepare()
            start_time = time.perf_counter()
            feats, nfes = [], []
            for b in range(shard.start, shard.stop, batch_size):
                images, nfe = source.images(b, min(b + batch_size, shard.stop))
                feats.append(extractor(images).numpy())
                nfes.append(nfe)
                bar.update(len(images))
            seconds = time.perf_counter() - start_time
            write_shard(shard, np.concatenate(feats).astype(np.float32), np.concatenate(nfes), seconds, settings_digest)
            done_here += 1
            log(f"shard {shard.index + 1}/{len(shards)} (samples {shard.start}–{shard.stop - 1}) done in {seconds:.1f} s"
                + (f" on rank {rank}" if world > 1 else ""))
    except Exception as err:  # reported collectively, so that the other ranks do not wait for this one
        if world == 1:
            raise
        error = f"{type(err).__name__}: {err}"
    finally:
        if bar is not None:
            bar.close()
    _agree(error, "generating shards")

    result = None
    if rank == 0:
        try:
            result = _finish(shards, extractor, reference, reference_name, workdir, settings_digest,
                             kid_subsets, kid_subset_size, kid_seed, log)
        except Exception as err:
            if world == 1:
                raise
            result = f"{type(err).__name__}: {err}"
    result = _broadcast(result)
    if isinstance(result, str):
        raise ValueError(f"computing statistics (rank 0): {result}")
    return result


def _finish(shards, extractor, reference, reference_name, workdir, settings_digest, kid_subsets, kid_subset_size,
            kid_seed, log) -> FIDResult | Incomplete:
    feats, nfes, missing, seconds = [], [], [], 0.0
    for shard in shards:
        done, _ = read_shard(shard, extractor.dim, settings_digest)
        if done is None:
            missing.append(shard.index)
            continue
        feats.append(done["features"])
        nfes.append(done["nfe"])
        seconds += done["seconds"]
    if missing:
        done = len(shards) - len(missing)
        log(f"{done} of {len(shards)} shards done; rerun the same command to continue")
        return Incomplete(done, len(shards), str(workdir))
    features = np.concatenate(feats)
    nfe = np.concatenate(nfes)
    stats = Statistics.from_features(features, extractor.id, kid_max=0)
    fid = stats.fid(reference)
    k_mean = k_std = k_size = None
    if reference.kid_features is not None and kid_subsets > 0:
        k_mean, k_std, k_size = kid(features, reference.kid_features, subsets=kid_subsets, subset_size=kid_subset_size,
                                    seed=kid_seed)
    result = FIDResult(fid, k_mean, k_std, k_size, kid_subsets, len(features),
                       float(nfe.mean()) if nfe.any() else None, extractor.id, reference_name or "",
                       reference.count, str(workdir), seconds)
    _write_json(workdir / "result.json", dataclasses.asdict(result))
    return result


def reference_statistics(data: str, extractor: FeatureExtractor, *, batch_size: int = 250, kid_max: int = 10_000,
                         log: Callable[[str], None] | None = None) -> Statistics:
    """Statistics of ``data`` (see :func:`data_images`) under ``extractor``."""
    images = data_images(data)
    if len(images) < 2:
        raise ValueError(f"{data}: statistics need at least 2 images, got {len(images)}")
    feats = [extractor(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
    if log:
        log(f"{len(images)} images of {data} -> {extractor.dim}-d features")
    return Statistics.from_features(np.concatenate(feats), extractor.id, kid_max=kid_max)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["FIDResult", "FolderSource", "Incomplete", "ModelSource", "data_images", "evaluate", "get_extractor",
           "init_distributed", "reference_statistics"]
