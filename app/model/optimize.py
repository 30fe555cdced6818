"""Rewrites of an eval-mode model that make inference faster without changing what it computes.

* ``fold_batchnorm``: in eval mode a BatchNorm is a fixed per-channel affine map, so when it
  reads a convolution's output it can be folded into that convolution's weights and bias, and
  the BatchNorm pass over the activations disappears (measured 1.37x for EfficientNet-Lite0's
  forward pass on the CPU, top-1 unchanged). Candidates are found from the module tree, then
  proven twice before the rewrite is kept: hooks on a probe forward pass check that each
  BatchNorm reads exactly its convolution's output, and the rewritten model must give the
  original's logits on that probe. Anything unproven is left as it was.
* ``compile_buckets``, ``batch_plans`` and ``CompiledBatches``: the batch sizes a
  ``torch.compile``-d model is compiled for, all during warm-up so that no request ever pays for
  a compilation, and how each batch size runs as them (padded up, or split), chosen from each
  size's measured cost.
* ``SplitBatches``: the same plans for an eager module, which runs any size as it is: on the
  CPU a large batch can cost more per image than a small one (EfficientNet-Lite0 on 2 cores:
  16 images in one pass 213 to 316 ms, as four passes of 4 136 to 173 ms, the same logits), so
  each batch runs as the cheapest mix of the sizes timed at warm-up.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("evalserve.optimize")

# The folded model's logits must match the original's to this fraction of the largest logit
# (folding reorders float32 rounding: measured differences are around 1e-6 of it; a wrong fold
# changes logits by a whole BatchNorm's scale and shift).
FOLD_TOLERANCE = 1e-4


def _candidate_pairs(module: nn.Module) -> list[tuple[nn.Module, nn.Conv2d, str]]:
    """(parent, conv, batchnorm name) for each foldable BatchNorm2d declared right after a
    Conv2d of matching width in the same parent. Declaration order is only a hint; the probe
    decides."""
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and _remainder(bn) is not None
                and bn.running_mean is not None
                and bn.running_var is not None
                and conv.out_channels == bn.num_features
            ):
                pairs.append((parent, conv, bn_name))
    return pairs


def _remainder(bn: nn.Module) -> nn.Module | None:
    """What is left of ``bn`` once its normalisation is folded away, for the BatchNorm classes
    whose forward is known: nothing for torch's own, the dropout and activation for timm's
    BatchNormAct2d. None for any other subclass, whose forward may do more."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    kind = type(bn)
    if kind.__name__ == "BatchNormAct2d" and kind.__module__.startswith("timm."):
        drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
        if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
            return nn.Sequential(drop, act)
    return None


def _proven(
    module: nn.Module, pairs: list[tuple[nn.Module, nn.Conv2d, str]], probe: torch.Tensor
) -> tuple[list[tuple[nn.Module, nn.Conv2d, str]], torch.Tensor]:
    """The pairs where, on a probe forward pass, every call of the BatchNorm read the tensor
    its convolution had just produced, and nothing else; and that pass's output."""
    outputs: dict[int, list[torch.Tensor]] = {id(conv): [] for _, conv, _ in pairs}
    inputs: dict[int, list[torch.Tensor]] = {
        id(getattr(parent, name)): [] for parent, _, name in pairs
    }

    def conv_hook(conv: nn.Module, _args: object, output: torch.Tensor) -> None:
        outputs[id(conv)].append(output)

    def bn_hook(bn: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs[id(bn)].append(args[0])

    handles = []
    for parent, conv, name in pairs:
        handles.append(conv.register_forward_hook(conv_hook))
        handles.append(getattr(parent, name).register_forward_pre_hook(bn_hook))
    try:
        output = module(probe)
    finally:
        for handle in handles:
            handle.remove()
    proven = []
    for parent, conv, name in pairs:
        made, read = outputs[id(conv)], inputs[id(getattr(parent, name))]
        if made and len(made) == len(read) and all(a is b for a, b in zip(made, read, strict=True)):
            proven.append((parent, conv, name))
    return proven, output


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv's weights and bias absorb bn's eval-mode affine map (computed in float64)."""
    assert bn.running_mean is not None
    assert bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)


def fold_batchnorm(module: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of eval-mode ``module`` with every provable conv + BatchNorm pair folded, and how
    many were folded; ``module`` itself and 0 when none is, or when the copy's logits on
    ``probe`` differ from the original's."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode")
    if not _candidate_pairs(module):
        return module, 0
    # no_grad, not inference_mode: parameters made under inference_mode would be inference
    # tensors, unusable by the model outside it.
    with torch.no_grad():
        folded = copy.deepcopy(module)
        # The copy's pass before folding is the original's: it is the reference.
        pairs, expected = _proven(folded, _candidate_pairs(folded), probe)
        if not pairs:
            return module, 0
        for parent, conv, name in pairs:
            bn = getattr(parent, name)
            remainder = _remainder(bn)
            assert remainder is not None
            _fold_into(conv, bn)
            setattr(parent, name, remainder.eval())
        expected, got = expected.float(), folded(probe).float()
    error = (expected - got).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    if not error <= FOLD_TOLERANCE * scale:
        logger.warning(
            "BatchNorm folding changed the logits by %.3g (largest %.3g): not folded", error, scale
        )
        return module, 0
    return folded, len(pairs)


def compile_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size``: few enough to compile
    at start-up, and any batch size is a sum of them (see ``batch_plans``)."""
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def batch_plans(costs: dict[int, float], largest: int) -> dict[int, tuple[int, ...]]:
    """For each batch size 1..``largest``, the compiled sizes to run it as, cheapest first by
    the measured ``costs`` (seconds per forward pass of each compiled size).

    A batch of n can be padded up to one compiled size or split across several (each part
    padded up to its size); which is cheaper depends on the device: on a CPU a forward pass
    costs about its batch size, so 9 images run as 8 + 1 rather than padded to 16, while on a
    GPU a pass of 16 costs little more than a pass of 1, so they run padded to 16.
    """
    if not costs:
        raise ValueError("no compiled sizes")
    best: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for n in range(1, largest + 1):
        best.append(
            min(
                (costs[size] + best[max(0, n - size)][0], (size, *best[max(0, n - size)][1]))
                for size in costs
            )
        )
    return {n: tuple(sorted(best[n][1], reverse=True)) for n in range(1, largest + 1)}


class CompileError(RuntimeError):
    """A compiled size did not really compile (dynamo fell back to eager)."""


class CompiledBatches:
    """A ``torch.compile``-d module that only ever runs at the batch sizes it was compiled for.

    ``compile(sizes, forward)`` compiles one graph per size during warm-up (``forward(n)`` runs
    a pass of ``n`` images through the real serving path and returns its seconds); ``plan`` then
    chooses, from each size's measured cost, how every batch size runs as them (``batch_plans``).
    Calling it runs a batch as its plan: each part padded with zero images up to its compiled
    size and the padding rows dropped. Rows never mix in an eval-mode model, so neither padding
    nor splitting changes the real images' scores.
    """

    def __init__(self, module: nn.Module, options: dict[str, Any]) -> None:
        # dynamic=False: one graph per compiled batch size.
        self._compiled: Any = torch.compile(module, dynamic=False, options=options)
        # Captured as CUDA graphs (reduce-overhead): a replay writes its output where the
        # previous replay's was, so each output is copied out before the next call.
        self._cudagraphs = bool(options.get("triton.cudagraphs"))
        # The compiled sizes, and how each batch size runs as them; both set by ``plan``.
        self.buckets: tuple[int, ...] = ()
        self.plans: dict[int, tuple[int, ...]] = {}

    def compile(self, sizes: tuple[int, ...], forward: Callable[[int], float]) -> dict[int, float]:
        """Compile a graph for each of ``sizes``, refusing a silent fall back to eager; returns
        the seconds each size took to compile."""
        from torch._dynamo import config as dynamo_config
        from torch._dynamo.utils import counters

        # dynamo keeps at most recompile_limit graphs per code object, shared by every model of
        # the same class, and past it runs eagerly (with a warning): make room for these sizes.
        dynamo_config.recompile_limit += len(sizes)
        seconds = {}
        for size in sizes:
            graphs = counters["stats"]["unique_graphs"]
            seconds[size] = forward(size)
            if counters["stats"]["unique_graphs"] == graphs:
                raise CompileError(
                    f"torch.compile made no graph for batches of {size} (see the log); "
                    "set compile = false"
                )
        return seconds

    def plan(self, costs: dict[int, float], largest: int) -> None:
        """Run every batch size up to ``largest`` as the cheapest mix of the measured sizes."""
        self.plans = batch_plans(costs, largest)
        self.buckets = tuple(costs)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        plan = self.plans.get(batch.shape[0])
        if plan is None:  # during warm-up: compile (or run) this size as it is
            return self._run(batch)
        parts, start = [], 0
        for bucket in plan:
            chunk = batch[start : start + bucket]
            start += chunk.shape[0]
            parts.append(self._run(padded(chunk, bucket))[: chunk.shape[0]])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if not self._cudagraphs:
            logits: torch.Tensor = self._compiled(batch)
            return logits
        # Each call is a new step for CUDA graph trees, whose outputs of the last step this
        # code no longer holds (the clone below is what it keeps).
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        replayed: torch.Tensor = self._compiled(batch)
        return replayed.clone()


class SplitBatches:
    """An eager forward function that runs each batch as the cheapest mix of measured sizes.

    ``plan(costs, largest)`` takes the seconds of one pass at each size (``batch_plans``);
    calling it then runs a batch of n as its plan's parts, each a slice of the batch (eager
    modules take any size, so nothing is padded: a part of 4 planned for 3 images runs 3).
    Before ``plan``, and for sizes beyond the plans, a batch runs whole. Rows never mix in an
    eval-mode model, so splitting does not change any image's scores.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._forward = forward
        self.plans: dict[int, tuple[int, ...]] = {}

    def plan(self, costs: dict[int, float], largest: int) -> None:
        self.plans = batch_plans(costs, largest)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        plan = self.plans.get(batch.shape[0], ())
        if len(plan) <= 1:
            return self._forward(batch)
        parts, start = [], 0
        for size in plan:
            if start >= batch.shape[0]:
                break
            parts.append(self._forward(batch[start : start + size]))
            start += size
        return torch.cat(parts)


def padded(batch: torch.Tensor, bucket: int) -> torch.Tensor:
    """``batch`` padded with zero images up to ``bucket`` rows, channels_last, with the strides
    warm-up compiled for (different strides would also recompile)."""
    _, channels, height, width = batch.shape
    channels_last = (channels * height * width, 1, width * channels, channels)
    if batch.shape[0] == bucket and batch.stride() == channels_last:
        return batch  # the common case: no copy, no allocation
    staged = torch.empty(
        (bucket, channels, height, width),
        dtype=batch.dtype,
        device=batch.device,
        memory_format=torch.channels_last,
    )
    staged[: batch.shape[0]] = batch
    staged[batch.shape[0] :] = 0
    return staged
