"""The model wrapper every sampler and solver calls: a network plus its noise schedule and prediction type.

``DiffusionModel(net, schedule, prediction)`` turns any network output (ε, x0, v or score) into the pair
(ε̂, x̂0) at continuous time t, applies classifier-free guidance with the conditional and unconditional passes
batched into one forward, and counts network evaluations. Conditioning is either class labels (a (batch,)
integer tensor) or text-encoder embeddings (:class:`TextConditioning`, passed in the same ``class_labels``
slot, for cross-attention UNets such as Stable Diffusion's; see :mod:`diffsolve.pipelines`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .schedules import NoiseSchedule

Tensor = torch.Tensor

PREDICTIONS = ("epsilon", "x0", "v", "score")
_ALIASES = {"sample": "x0", "v_prediction": "v", "eps": "epsilon"}


class Prediction:
    """The model's estimate at (x, t): noise ε̂ and clean data x̂0 with x = α x̂0 + σ ε̂.

    Either may be given as a function of no arguments that computes it when first read, so that a sampler
    that uses only ε̂ (or only x̂0) does not pay for the conversion to the other."""

    __slots__ = ("_eps", "_x0")

    def __init__(self, eps: Tensor | Callable[[], Tensor], x0: Tensor | Callable[[], Tensor]):
        self._eps, self._x0 = eps, x0

    @property
    def eps(self) -> Tensor:
        if not isinstance(self._eps, Tensor):
            self._eps = self._eps()
        return self._eps

    @property
    def x0(self) -> Tensor:
        if not isinstance(self._x0, Tensor):
            self._x0 = self._x0()
        return self._x0


@dataclass
class TextConditioning:
    """Text-encoder embeddings for a cross-attention network (diffusers' ``encoder_hidden_states``).

    ``cond`` (batch, tokens, dim) embeds the prompts; ``uncond`` (same shape) the negative or empty prompts,
    used by classifier-free guidance: out_u + w (out_c − out_u), one forward of 2·batch samples ordered
    (uncond, cond) as diffusers' pipelines order them. ``uncond`` may be None when guidance_scale = 1.
    """

    cond: Tensor
    uncond: Tensor | None = None

    def __len__(self) -> int:
        return self.cond.shape[0]

    def to(self, device) -> "TextConditioning":
        return TextConditioning(self.cond.to(device), None if self.uncond is None else self.uncond.to(device))


def _expand(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient of shape (batch,) broadcast against x."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


@dataclass(frozen=True)
class KnownTime:
    """A time whose coefficients are known before sampling: the network's time input (``network_time``, on
    the device, one per sample) and α, σ as host floats."""

    net_time: Tensor
    alpha: float
    sigma: float


def _convert(prediction: str, x: Tensor, out: Tensor, alpha, sigma) -> Prediction:
    """(ε̂, x̂0) from the network output ``out`` of kind ``prediction``; α, σ host floats or columns against x.
    With floats each conversion is two fused operations (``torch.add(..., alpha=)`` and a scaling), done only
    when the converted quantity is read."""
    if isinstance(alpha, float):
        if prediction == "epsilon":
            return Prediction(eps=out, x0=lambda: torch.add(x, out, alpha=-sigma).mul_(1.0 / alpha))
        if prediction == "x0" and sigma > 0:
            return Prediction(eps=lambda: torch.add(x, out, alpha=-alpha).mul_(1.0 / sigma), x0=out)
    if prediction == "epsilon":
        eps = out
        x0 = (x - sigma * eps) / alpha
    elif prediction == "x0":
        x0 = out
        eps = (x - alpha * x0) / sigma
    elif prediction == "v":  # v = α ε − σ x0; α² + σ² = 1 for VP, kept general for VE
        norm = alpha**2 + sigma**2
        x0 = (alpha * x - sigma * out) / norm
        eps = (sigma * x + alpha * out) / norm
    else:  # score = −ε/σ
        eps = -sigma * out
        x0 = (x - sigma * eps) / alpha
    return Prediction(eps=eps, x0=x0)


class CapturedNetwork:
    """A network call ``network(x, net_time, kwargs)`` captured in a CUDA graph per input signature (shapes,
    dtypes, autocast state) and replayed: each call copies its inputs into the graph's static buffers and
    copies the output out of it (samplers keep outputs across steps, and the next replay overwrites it). The
    first call of a signature warms the network up on a side stream (lazy initialisation, workspaces), then
    captures it."""

    def __init__(self, network: Callable):
        self.network = network
        self.graphs: dict = {}

    def __call__(self, x: Tensor, net_time: Tensor, kwargs: dict) -> Tensor:
        inputs = [x, net_time, *kwargs.values()]
        key = (tuple((v.shape, v.dtype, v.device) for v in inputs), tuple(kwargs),
               torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, net_time, kwargs)
        static, graph, out = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, x: Tensor, net_time: Tensor, kwargs: dict):
        static = [v.clone() for v in (x, net_time, *kwargs.values())]
        static_kwargs = dict(zip(kwargs, static[2:]))
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.network(static[0], static[1], static_kwargs)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.network(static[0], static[1], static_kwargs)
        return static, graph, out


class DiffusionModel:
    """A denoising network with its schedule.

    Args:
        net: a diffusers ``UNet2DModel`` (it receives the discrete timestep its training used:
            ``schedule.model_time(t)``), or any callable ``net(x, t)`` / ``net(x, t, class_labels)``
            receiving continuous time ``t`` of shape ``(batch,)``.
        schedule: the noise schedule the network was trained with.
        prediction: what the network outputs: ``"epsilon"``, ``"x0"`` (diffusers' ``"sample"``), ``"v"``
            (``"v_prediction"``) or ``"score"`` (∇ log p_t). With 2·C output channels for C input channels
            (learned variance) the first C are used.
        num_classes: number of real classes of a class-conditional network (read from a UNet's
            ``num_class_embeds`` − 1 when not given, or ``num_class_embeds`` when its config says
            ``_diffsolve_has_null_class: false``, as converted guided-diffusion networks do); ``None`` for an
            unconditional one.
        null_class: the label of the unconditional ("null") class used for guidance and for sampling without
            labels; defaults to ``num_classes`` (the last embedding). A network trained without one (guided-diffusion's
            class-conditional models) has none: it needs ``class_labels`` and cannot be guided.
        sample_shape: the shape of one sample, ``(C, H, W)`` (read from a UNet's config when not given).
    """

    def __init__(
        self, net: Callable, schedule: NoiseSchedule, prediction: str = "epsilon", *,
        num_classes: int | None = None, null_class: int | None = None, sample_shape: tuple[int, ...] | None = None,
    ):
        prediction = _ALIASES.get(prediction, prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {list(PREDICTIONS)} (or diffusers' 'sample', "
                             f"'v_prediction'), got {prediction!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a diffsolve NoiseSchedule, got {type(schedule).__name__}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        config = getattr(net, "config", None)
        self.is_diffusers = config is not None and hasattr(net, "forward") and "sample_size" in config
        has_null_class = True
        if self.is_diffusers:
            if num_classes is None and config.get("num_class_embeds"):
                has_null_class = config.get("_diffsolve_has_null_class", True)
                num_classes = int(config["num_class_embeds"]) - has_null_class
            if sample_shape is None:
                size = config["sample_size"]
                size = (size, size) if isinstance(size, int) else tuple(size)
                sample_shape = (int(config["in_channels"]), *size)
        self.num_classes = num_classes
        self.null_class = None
        if num_classes is not None and has_null_class:
            self.null_class = num_classes if null_class is None else null_class
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.nfe = 0

    #: (network dtype, network callable) set by :meth:`evaluating`; (None, None): the network as it is
    _evaluation: tuple[torch.dtype | None, Callable | None] = (None, None)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def reset_nfe(self) -> None:
        self.nfe = 0

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None) if isinstance(self.net, torch.nn.Module) else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype | None:
        p = next(self.net.parameters(), None) if isinstance(self.net, torch.nn.Module) else None
        return p.dtype if p is not None else None

    def check_conditioning(self, batch: int, class_labels, guidance_scale: float) -> Tensor | None:
        """Validate ``class_labels``/``guidance_scale`` for a batch; returns labels as a tensor (or None)."""
        if class_labels is None:
            if self.num_classes is not None and self.null_class is None:
                raise ValueError(f"class_labels: this class-conditional model has no unconditional class: give one "
                                 f"label in [0, {self.num_classes - 1}] per sample")
            if guidance_scale != 1.0:
                raise ValueError(f"guidance_scale={guidance_scale} needs class_labels (guidance mixes the "
                                 "conditional and unconditional predictions)")
            return None
        if self.num_classes is None:
            raise ValueError("class_labels were given, but the model is not class-conditional")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"class_labels: expected 1 or {batch} labels (one per sample), got {labels.numel()}")
        top = self.num_classes if self.null_class is not None else self.num_classes - 1
        valid = (labels >= 0) & (labels <= top)
        if not bool(valid.all()):
            null = f" ({self.null_class} is the null class)" if self.null_class is not None else ""
            raise ValueError(f"class_labels: expected integers in [0, {top}]{null}, got {labels.tolist()}")
        if guidance_scale != 1.0 and self.null_class is None:
            raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs an unconditional "
                             "class, which this model was trained without")
        return labels

    # ---- evaluation -----------------------------------------------------------------------------------
    def network_time(self, t: Tensor) -> Tensor:
        """The time input the network receives at continuous times ``t``: a diffusers UNet gets its training
        timestep ``schedule.model_time(t)`` in float32 (it embeds time in float32 whatever its own dtype: a
        bfloat16 timestep would round 999 to 1000), any other callable t itself."""
        return self.schedule.model_time(t).to(torch.float32) if self.is_diffusers else t

    @contextmanager
    def evaluating(self, dtype: torch.dtype | None = None, network: Callable | None = None):
        """Within the block the network runs in ``dtype`` (None: its parameters' dtype, or the input's for a
        parameterless callable) and through ``network`` (a compiled or graph-captured twin of ``raw_network``;
        None: ``raw_network`` itself). Inputs are cast to ``dtype`` and outputs back to the caller's dtype, so
        the sampler's state keeps its own precision. A module whose parameters are float32 runs a half
        ``dtype`` under ``torch.autocast`` (its weights are not copied)."""
        saved = self._evaluation
        self._evaluation = (dtype, network)
        try:
            yield
        finally:
            self._evaluation = saved

    def raw_network(self, x: Tensor, net_time: Tensor, kwargs: dict) -> Tensor:
        """One network call on inputs already prepared (``network_time``, dtype): the tensor it outputs."""
        if self.is_diffusers:
            return self.net(x, net_time, **kwargs).sample
        cond = kwargs.get("cond")
        return self.net(x, net_time) if cond is None else self.net(x, net_time, cond)

    def accelerated_network(self, compile: bool = False, cuda_graph: bool = False) -> Callable | None:
        """``raw_network`` through ``torch.compile`` and/or captured in CUDA graphs (one per input shape and
        dtype, replayed), made once per model and reused by later runs; None when neither is asked."""
        if not (compile or cuda_graph):
            return None
        key = (compile, cuda_graph)
        cache = self.__dict__.setdefault("_accelerated", {})
        if key not in cache:
            network = torch.compile(self.raw_network) if compile else self.raw_network
            cache[key] = CapturedNetwork(network) if cuda_graph else network
        return cache[key]

    def _forward(self, x: Tensor, t: Tensor, labels: Tensor | None, embeds: Tensor | None = None,
                 net_time: Tensor | None = None) -> Tensor:
        requested, network = self._evaluation
        params = self.dtype
        dtype = requested or params or x.dtype
        net_time = self.network_time(t) if net_time is None else net_time
        if self.is_diffusers:
            kwargs = {} if labels is None else {"class_labels": labels}
            if embeds is not None:
                kwargs["encoder_hidden_states"] = embeds.to(dtype)
        else:
            cond = labels if embeds is None else embeds
            kwargs = {} if cond is None else {"cond": cond}
        network = network or self.raw_network
        if params is not None and dtype != params:  # float32 weights, half compute: autocast, no weight copy
            # no autocast cache: a captured CUDA graph must not hold casts made outside it
            with torch.autocast(x.device.type, dtype=dtype, cache_enabled=False):
                out = network(x.to(dtype), net_time, kwargs)
        else:
            out = network(x.to(dtype), net_time, kwargs)
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)

    def output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, guidance_scale: float = 1.0,
               net_time: Tensor | None = None) -> Tensor:
        """The raw network output at continuous time ``t`` (shape ``(batch,)``), guided if asked; ``net_time``,
        when given, is ``network_time(t)`` prepared in advance.

        A class-conditional model without labels gets its null class. Guidance: out_u + w (out_c − out_u),
        one batched forward of 2·batch samples; it commutes with the (affine) conversions below.
        ``class_labels`` may also be a :class:`TextConditioning` (text-conditional networks).
        """
        self.nfe += 1
        if isinstance(class_labels, TextConditioning):
            text = class_labels
            if text.uncond is None or guidance_scale == 1.0:
                return self._forward(x, t, None, text.cond, net_time)
            return self._guided(x, t, guidance_scale, net_time, embeds=(text.uncond, text.cond))
        if self.num_classes is not None and class_labels is None:
            self.check_conditioning(x.shape[0], None, guidance_scale)  # no null class: a clear error
            class_labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        if class_labels is None or guidance_scale == 1.0:
            labels = None if class_labels is None else class_labels.to(x.device)
            return self._forward(x, t, labels, net_time=net_time)
        labels = class_labels.to(x.device)
        return self._guided(x, t, guidance_scale, net_time, labels=(torch.full_like(labels, self.null_class), labels))

    def _guided(self, x: Tensor, t: Tensor, guidance_scale: float, net_time: Tensor | None, labels: tuple | None = None,
                embeds: tuple | None = None) -> Tensor:
        """out_u + w (out_c − out_u) from one forward of the batch [unconditional; conditional] (diffusers'
        order); ``labels`` / ``embeds`` are (unconditional, conditional) pairs."""
        both = self._forward(torch.cat([x, x]), torch.cat([t, t]), None if labels is None else torch.cat(labels),
                             None if embeds is None else torch.cat(embeds),
                             None if net_time is None else torch.cat([net_time, net_time]))
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def predict(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, guidance_scale: float = 1.0,
                known: "KnownTime | None" = None) -> Prediction:
        """(ε̂, x̂0) at ``(x, t)``: the single place where prediction types are converted. ``known`` supplies
        what a fixed grid point knows before sampling (the network's time input, α and σ as host floats), so
        the evaluation does no schedule lookups on the device."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.output(x, t, class_labels, guidance_scale, None if known is None else known.net_time)
        if known is not None:
            return _convert(self.prediction, x, out, known.alpha, known.sigma)
        alpha, sigma = (_expand(c, x).to(x.dtype) for c in self.schedule.alpha_sigma(t))
        return _convert(self.prediction, x, out, alpha, sigma)

    def __repr__(self) -> str:
        net = type(self.net).__name__
        return (f"DiffusionModel(net={net}, schedule={self.schedule!r}, prediction={self.prediction!r}, "
                f"num_classes={self.num_classes}, sample_shape={self.sample_shape})")
