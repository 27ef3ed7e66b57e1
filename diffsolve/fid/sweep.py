"""NFE sweeps: FID of several samplers at several step counts (adaptive samplers: several tolerances), as a Markdown
table and a FID-vs-NFE plot."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Callable

from ..files import atomic_write
from .features import FeatureExtractor
from .run import FIDResult, Incomplete, ModelSource, evaluate
from .stats import Statistics


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ModuleNotFoundError("the sweep plot needs matplotlib: pip install 'diffsolve[plot]' (or leave out "
                                  "--out-png to write only the table)", name="matplotlib") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_tolerances(samplers: list[str], rtols: list[float] | None, options: dict[str, dict] | None = None) -> None:
    """An adaptive sampler chooses its own steps, so a sweep varies its relative tolerance ``rtol`` instead:
    ``rtols`` must be given exactly when ``samplers`` names one, and not also as a per-sampler option."""
    import inspect

    from ..registry import get_sampler

    adaptive = [name for name in samplers if get_sampler(name).adaptive]
    if adaptive and not rtols:
        raise ValueError(f"--samplers {','.join(samplers)}: {', '.join(adaptive)} chooses its own steps, so the sweep "
                         "varies its tolerance instead of --steps; give --rtol, e.g. --rtol 0.1,0.05,0.02 (each point "
                         "is reported at its measured mean NFE)")
    if rtols and not adaptive:
        raise ValueError(f"--rtol {','.join(f'{r:g}' for r in rtols)}: sets the tolerance of adaptive samplers, and "
                         f"--samplers {','.join(samplers)} names none; sweep fixed-step samplers with --steps")
    for name in adaptive:
        if "rtol" not in inspect.signature(get_sampler(name).fn).parameters:
            raise ValueError(f"--samplers {name}: this adaptive sampler has no rtol option to sweep; evaluate it with "
                             f"`diffsolve fid --sampler {name}`")
        if "rtol" in (options or {}).get(name, {}):
            raise ValueError(f"--option {name}:rtol={options[name]['rtol']}: the sweep sets {name}'s rtol from --rtol; "
                             "leave this option out")


def sweep(model: str, samplers: list[str], steps: list[int], *, rtols: list[float] | None = None,
          options: dict[str, dict] | None = None, extractor: FeatureExtractor,
          reference: Statistics, reference_name: str, workdir: str | Path, num: int, seed_start: int = 0,
          shard_size: int = 1000, batch_size: int = 250, device: str | None = None, max_shards: int | None = None,
          kid_subsets: int = 100, kid_subset_size: int = 1000, log: Callable[[str], None] | None = None,
          progress: bool = False, scheduler_config: str | Path | None = None) -> list[dict]:
    """Run :func:`~diffsolve.fid.run.evaluate` for every point of the sweep, each in its own sub-workdir (so
    the sweep resumes too): a fixed-step sampler at every step count of ``steps`` (``workdir/<sampler>-<steps>``),
    an adaptive one at every relative tolerance of ``rtols`` (``workdir/<sampler>-rtol<rtol>``; its NFE is the
    measured mean). ``options`` maps a sampler name to its options. Returns one row dict per point; ``fid`` is
    None for a point that ``max_shards`` left unfinished."""
    from ..registry import get_sampler

    if not samplers or not steps:
        raise ValueError("sweep: give at least one sampler and one step count")
    for s in steps:
        if s < 1:
            raise ValueError(f"--steps: expected integers >= 1, got {s}")
    options = options or {}
    check_tolerances(samplers, rtols, options)  # every sampler is checked before anything runs
    points = []  # (sampler, steps, rtol, sub-workdir name)
    for name in samplers:
        if get_sampler(name).adaptive:
            points += [(name, None, r, f"{name}-rtol{r:g}") for r in rtols]
        else:
            points += [(name, s, None, f"{name}-{s}") for s in steps]
    sources = [ModelSource(model, name, s, seed_start=seed_start, device=device, scheduler_config=scheduler_config,
                           options={**options.get(name, {}), **({} if r is None else {"rtol": r})})
               for name, s, r, _ in points]
    rows, shared_model = [], None
    for (name, s, r, folder), source in zip(points, sources):
        if shared_model is not None:
            source._model = shared_model
        if log:
            log(f"== {name}, " + (f"{s} steps" if r is None else f"rtol {r:g}"))
        result = evaluate(source, extractor, reference, Path(workdir) / folder, num=num, shard_size=shard_size,
                          batch_size=batch_size, max_shards=max_shards, kid_subsets=kid_subsets,
                          kid_subset_size=kid_subset_size, log=log, reference_name=reference_name, progress=progress)
        shared_model = source._model if source._model is not None else shared_model
        row = {"sampler": name, "steps": s, "rtol": r, "nfe": None, "fid": None, "kid": None, "kid_std": None,
               "seconds_per_sample": None, "count": num}
        if isinstance(result, FIDResult):
            row.update(nfe=result.nfe, fid=result.fid, kid=result.kid, kid_std=result.kid_std,
                       seconds_per_sample=result.compute_seconds / result.count)
        elif isinstance(result, Incomplete):
            row["done"] = f"{result.done}/{result.total} shards"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], title: str | None = None) -> str:
    """One line per (sampler, steps or rtol): NFE (an adaptive sampler's measured mean), FID, KID ± its std over
    subsets (×10³), compute seconds per sample (generation and features, summed over the shards)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| sampler | steps | NFE | FID | KID×10³ | s / sample |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = f"rtol {r['rtol']:g}" if r.get("rtol") is not None else r["steps"]
        nfe = "–" if r["nfe"] is None else f"{r['nfe']:g}"
        fid = f"unfinished ({r.get('done', '')})" if r["fid"] is None else f"{r['fid']:.3f}"
        kid = "–" if r["kid"] is None else f"{1e3 * r['kid']:.4g} ± {1e3 * r['kid_std']:.2g}"
        sps = "–" if r["seconds_per_sample"] is None else f"{r['seconds_per_sample']:.2e}"
        lines.append(f"| {r['sampler']} | {steps} | {nfe} | {fid} | {kid} | {sps} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """FID against NFE, one line per sampler (log–log), written atomically as a PNG."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == name and r["fid"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    axes = [ax.xaxis]
    fids = [r["fid"] for r in rows if r["fid"] is not None and r["fid"] > 0]
    if fids and max(fids) > 5 * min(fids):
        ax.set_yscale("log")
        axes.append(ax.yaxis)
    for axis in axes:  # 1, 2, 5, 10, 20, ... as plain numbers
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
