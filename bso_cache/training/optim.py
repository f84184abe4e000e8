"""The optimizer and the learning-rate schedule of a training run (TrainConfig's choices).

Plain float32 weights with a torch optimizer and no memory lever take torch's optimizer as it is
(fused AdamW / SGD where the parameters allow: one kernel over all of them). Every other case
goes through `ParamwiseOptimizer`, which steps each parameter on its own with an inner optimizer
(torch's, or bitsandbytes' / torchao's low-bit ones) and so can:

- make bf16 / fp16 weights learn: the update is computed in float32 and stochastically rounded
  to the weights' dtype (unbiased: E[round(w + d)] = w + d), so an update far below half an ulp
  moves the weight with the right probability instead of vanishing (chosen over float32 master
  weights by measurement: docs/PERFORMANCE.md, "bf16 weights");
- step inside the backward pass (`in_backward`): each parameter's update is applied as soon as
  its gradient is accumulated, and the gradient is freed at once (torchtune's optimizer-in-
  backward), so the gradients of the whole model are never held together;
- keep the optimizer state in CPU memory and update there (`offload`).
"""

from __future__ import annotations

import math
import weakref

import torch

from bso_cache.config import TrainConfig
from bso_cache.errors import ConfigError
from bso_cache.quantize import import_quietly

FUSED = ("adamw", "sgd")
FUSED_DEVICES = ("cpu", "cuda")
# Elements of one float32 working slice of a bf16 / offloaded parameter (16 MiB; a multiple of
# bitsandbytes' 2048- and torchao's 128-element quantization blocks, so slicing changes no state).
SLICE = 1 << 22
# name -> (module, package to install); the HF Trainer's names without the library prefix
LOW_BIT = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "rmsprop8bit": ("bitsandbytes", "bitsandbytes"),
           "adamw4bit": ("torchao", "torchao")}


def fusable(params) -> bool:
    """Plain floating-point tensors on the CPU or CUDA (not FSDP's DTensor shards)."""
    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                                and p.device.type in FUSED_DEVICES for p in params)


def check_optimizer_available(name: str) -> None:
    """A low-bit optimizer's library, checked before any model loads: one line naming the extra."""
    if name not in LOW_BIT:
        return
    import importlib.util

    module, package = LOW_BIT[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--optimizer {name} needs the `{package}` package: pip install 'bso-cache[lowbit]' "
                          f"(or pip install {package})")


def _inner_factory(cfg: TrainConfig):
    """A function making the configured optimizer over a list of parameters."""
    name, wd = cfg.optimizer, cfg.weight_decay
    if name in ("adamw", "rmsprop", "sgd"):
        kind = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}[name]

        def make(params):
            extra = {"fused": True} if name in FUSED and fusable(params) else {}
            return kind(params, lr=cfg.lr, weight_decay=wd, **extra)
        return make
    check_optimizer_available(name)
    if name == "adamw4bit":
        import_quietly("torchao")
        from torchao.optim import AdamW4bit

        return lambda params: AdamW4bit(params, lr=cfg.lr, weight_decay=wd)
    bnb = import_quietly("bitsandbytes")

    kind = {"adamw8bit": bnb.optim.AdamW8bit, "rmsprop8bit": bnb.optim.RMSprop8bit}[name]
    return lambda params: kind(params, lr=cfg.lr, weight_decay=wd)


def needs_paramwise(cfg: TrainConfig, params) -> bool:
    # torchao keeps lr as a tensor that a scheduler must not replace: its steps go through the wrapper too
    return bool(cfg.optimizer_in_backward or cfg.optimizer_offload or cfg.optimizer == "adamw4bit"
                or any(p.dtype != torch.float32 for p in params))


def make_optimizer(cfg: TrainConfig, params):
    """The run's optimizer over `params` (a list of trainable parameters)."""
    params = list(params)
    make = _inner_factory(cfg)
    if not needs_paramwise(cfg, params):
        return make(params)
    return ParamwiseOptimizer(params, make, lr=cfg.lr, offload=cfg.optimizer_offload,
                              in_backward=cfg.optimizer_in_backward, seed=cfg.seed)


def stochastic_round(x, dtype, generator):
    """x (float32) rounded to `dtype` up or down at random, up with probability (x - lo) / (hi - lo)
    where lo <= x <= hi are the neighbouring values of `dtype`: unbiased, E[result] = x."""
    if dtype == torch.bfloat16:
        # bf16 is float32's upper 16 bits: add 16 random low bits to the magnitude and truncate,
        # which carries into the kept bits with probability (low bits) / 2^16
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
        bits = noise.add_(x.contiguous().view(torch.int32)).bitwise_and_(-65536)
        return bits.view(torch.float32).to(torch.bfloat16)
    nearest = x.to(dtype)
    up = nearest.float() <= x
    toward = torch.where(up, torch.full_like(nearest, math.inf), torch.full_like(nearest, -math.inf))
    other = torch.nextafter(nearest, toward)
    lo = torch.where(up, nearest, other)
    hi = torch.where(up, other, nearest)
    lo32, hi32 = lo.float(), hi.float()
    width = hi32 - lo32
    p_hi = torch.where(width > 0, (x - lo32) / width, torch.zeros_like(x))
    r = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return torch.where(r < p_hi, hi, lo)


def squared_norm(grad) -> float:
    """The float32 sum of squares of a gradient, a slice at a time: `grad.float().pow(2).sum()`
    makes two float32 copies of the whole tensor, in the backward pass beside the activations
    (docs/PERFORMANCE-MEMORY.md)."""
    flat = grad.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), SLICE):
        part = flat[start:start + SLICE].float()
        total += torch.dot(part, part)
    return float(total)


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Steps each trainable parameter with its own inner optimizer over a float32 working tensor.

    A torch `Optimizer` to the trainer, the LR scheduler and checkpoints: one parameter group whose
    "lr" the schedule sets and every inner optimizer follows.
    """

    def __init__(self, params, make_inner, *, lr: float, offload: bool, in_backward: bool, seed: int):
        self.params = list(params)
        super().__init__(self.params, {"lr": lr})
        self.offload, self.in_backward = offload, in_backward
        self.state_device = torch.device("cpu") if offload else None
        # one generator per device the weights live on, seeded alike on every rank (replicas stay equal)
        self._generators: dict[str, torch.Generator] = {}
        self._seed = seed
        # per parameter, its slices: (start, end, working tensor, inner optimizer)
        self._slots = [self._new_slots(p, make_inner) for p in self.params]
        self.grad_sq = 0.0   # in-backward: the squared global norm of the gradients applied this step
        self._hooks = []
        if in_backward:
            for i, p in enumerate(self.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    # -------------------------------------------------------------- working tensors
    @property
    def _inner(self) -> list:
        return [inner for slots in self._slots for *_, inner in slots]

    @property
    def _work(self) -> list:
        return [work for slots in self._slots for _, _, work, _ in slots]

    def _new_slots(self, p, make_inner) -> list:
        if p.dtype == torch.float32 and not self.offload:  # the inner optimizer steps the parameter itself
            return [(0, p.numel(), p, make_inner([p]))]
        # handles whose storage is filled from a slice of the weights at each step and freed after it,
        # so the float32 copies never exceed one slice (a whole non-contiguous parameter)
        device = self.state_device if self.state_device is not None else p.device
        step = SLICE if p.is_contiguous() else p.numel()
        slots = []
        for start in range(0, p.numel(), step):
            work = torch.nn.Parameter(torch.empty(0, device=device, dtype=torch.float32))
            slots.append((start, min(start + step, p.numel()), work, make_inner([work])))
        return slots

    def _generator(self, device):
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed + 1_000_003)
        return self._generators[key]

    # -------------------------------------------------------------- stepping
    def _step_param(self, i: int) -> None:
        p = self.params[i]
        if p.grad is None:
            return
        lr = self.param_groups[0]["lr"]
        for start, end, work, inner in self._slots[i]:
            group = inner.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            if work is p:
                inner.step()
                continue
            with torch.no_grad():
                whole = end - start == p.numel()
                target = p.detach() if whole else p.detach().view(-1)[start:end]
                grad = p.grad.detach() if whole else p.grad.detach().reshape(-1)[start:end]
                work.data = target.to(work.device, torch.float32, copy=True)
                work.grad = grad.to(work.device, torch.float32, copy=True)
                inner.step()
                work.grad = None
                new = work.detach().to(p.device)
                if p.dtype == torch.float32:
                    target.copy_(new)
                else:
                    target.copy_(stochastic_round(new, p.dtype, self._generator(p.device)))
                del new
                work.data = torch.empty(0, device=work.device, dtype=torch.float32)

    def _hook(self, i: int):
        # The hook holds the optimizer weakly: a parameter keeps its hooks where the garbage collector
        # does not see them, so a strong reference would keep the optimizer, its states and the model
        # alive after the run, into the next run of a sweep (docs/GPU.md, "Correction").
        ref = weakref.ref(self)

        def hook(p) -> None:
            opt = ref()
            if opt is None:
                return
            opt.grad_sq += squared_norm(p.grad)
            opt._step_param(i)
            p.grad = None  # freed now: the whole model's gradients are never held at once
        return hook

    def close(self) -> None:
        """Take the backward-pass hooks off the parameters (the run is over; the model may live on)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def step(self, closure=None) -> None:  # noqa: D102 - torch's Optimizer.step
        if self.in_backward:
            return  # applied during the backward pass
        for i in range(len(self.params)):
            self._step_param(i)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.grad_sq = 0.0

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        out = {"inner": [o.state_dict() for o in self._inner], "lr": self.param_groups[0]["lr"],
               "generators": {k: g.get_state() for k, g in self._generators.items()}}
        return out

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("inner", [])) != len(self._inner):
            raise ConfigError("the checkpoint's optimizer state does not fit this run's optimizer options "
                              "(--optimizer, --dtype, --optimizer-offload); resume with the run's own")
        for o, s in zip(self._inner, state["inner"]):
            o.load_state_dict(s)
        self.param_groups[0]["lr"] = state["lr"]
        for key, g_state in state.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(g_state)


class Updates:
    """What the trainer asks of its optimizer, the same in every mode: `zero()` before a step's
    backward passes, `step()` after them, which returns the gradient norm before clipping (in the
    backward pass the updates were already made and the norm summed as they were), and `close()`
    when the run ends. `optimizer` is the torch optimizer, for the schedule and the checkpoints."""

    def __init__(self, cfg: TrainConfig, params) -> None:
        self.params = list(params)
        self.optimizer = make_optimizer(cfg, self.params)
        self.clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.in_backward = cfg.optimizer_in_backward

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        if self.in_backward:
            norm = math.sqrt(self.optimizer.grad_sq)
        else:
            total = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # a DTensor under FSDP
        self.optimizer.step()
        return norm

    def close(self) -> None:
        """The optimizer-in-backward hooks come off the model's parameters (the model may live on)."""
        if isinstance(self.optimizer, ParamwiseOptimizer):
            self.optimizer.close()


def make_schedule(cfg: TrainConfig, optimizer, total_steps: int):
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # step = number of updates done so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
