"""Training loop of the demo models: a transformers LlamaForCausalLM on pre-tokenized corpus files.

Runs on a GPU (bf16 autocast, fp32 master weights) and, for a smoke test, on the CPU. Everything
random draws from generators seeded with presets.SEED: the same `--steps` gives the same run (up
to the nondeterminism of GPU kernels).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from demo_model.presets import CONTEXT, SEED, Recipe

_PROBE_FROM, _PROBE_TO = 10, 40  # steps timed to decide how many steps fit the time budget
_SHARD_BYTES = 12 * 2**20  # files that come back from the GPU machine are limited to 16 MiB each


def load_tokens(corpus_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(corpus_dir / f"{split}.bin", dtype=np.uint16)


def build_model(recipe_shape, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(SEED)
    config = LlamaConfig(**recipe_shape.llama_config_kwargs())
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device)


def add_branch_dropout(model, p: float) -> list:
    """Dropout on each attention and MLP branch output, before the residual add (training only)."""
    if p <= 0:
        return []

    def hook(module, _inputs, output):
        return F.dropout(output, p, training=module.training)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    return handles


def lr_at(step: int, total: int, r: Recipe) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio * lr. Steps < warmup do not depend on total."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    frac = min(1.0, (step - r.warmup) / max(1, total - r.warmup))
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def epoch_windows(n_tokens: int, ctx: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Starts of `batch` windows of ctx+1 tokens, each token once per epoch (a random phase per epoch)."""
    while True:
        offset = int(torch.randint(0, ctx, (1,), generator=gen))
        n = (n_tokens - 1 - offset) // ctx
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield offset + perm[i : i + batch] * ctx  # [batch]


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, ctx: int, batch: int, device: torch.device) -> tuple[float, int]:
    """Mean next-token loss (nats) over non-overlapping windows covering the whole split."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    n = tokens.numel() - 1
    starts = list(range(0, n, ctx))
    for i in range(0, len(starts), batch):
        group = starts[i : i + batch]
        lens = {min(ctx, n - s) for s in group}
        for length in sorted(lens):  # only the split's last window is shorter
            rows = [s for s in group if min(ctx, n - s) == length]
            idx = torch.tensor(rows, device=device)[:, None] + torch.arange(length + 1, device=device)
            w = tokens[idx]  # [rows, length + 1]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=w[:, :-1], use_cache=False).logits  # [rows, length, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
            total += loss.double()
            count += w[:, 1:].numel()
    model.train()
    return float(total) / count, count


@dataclass
class RunResult:
    recipe: str
    params: int
    steps: int
    target_steps: int
    tokens_seen: int
    epochs_done: float
    train_seconds: float
    tokens_per_second: float
    best_step: int
    best_valid_loss: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, valid loss)
    state: dict | None = None  # best weights, fp32 on the CPU


def train(
    r: Recipe,
    train_tokens: np.ndarray,
    valid_tokens: np.ndarray,
    device: torch.device,
    log: Callable[[str], None],
    steps: int | None = None,
    batch: int | None = None,
    ctx: int = CONTEXT,
) -> RunResult:
    batch = batch or r.batch
    model = build_model(r.shape, device)
    model.train()
    hooks = add_branch_dropout(model, r.dropout)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=r.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    train_t = torch.from_numpy(train_tokens.astype(np.int64)).to(device)
    valid_t = torch.from_numpy(valid_tokens.astype(np.int64)).to(device)
    steps_per_epoch = (len(train_tokens) - ctx) // ctx // batch
    target = steps or math.ceil(r.epochs * steps_per_epoch)
    total = target
    eval_every = max(1, min(steps_per_epoch, target // 4))
    log(f"[{r.name}] params={params:,} steps/epoch={steps_per_epoch} target_steps={target}")

    gen = torch.Generator().manual_seed(SEED + 1)
    windows = epoch_windows(len(train_tokens), ctx, batch, gen)
    arange = torch.arange(ctx + 1, device=device)
    curve: list[tuple[int, float, float]] = []
    best = (float("inf"), -1)
    best_state = None
    loss_acc, loss_n = torch.zeros((), device=device), 0
    t_start = time.perf_counter()
    t_probe = t_start
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, r)
        w = train_t[next(windows).to(device)[:, None] + arange]  # [batch, ctx + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1], use_cache=False).logits  # [batch, ctx, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_acc += loss.detach()
        loss_n += 1
        step += 1
        if steps is None and step == _PROBE_FROM:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.perf_counter()
        if steps is None and step == _PROBE_TO:
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec_per_step = (time.perf_counter() - t_probe) / (_PROBE_TO - _PROBE_FROM)
            # ~8% of the budget is left for evaluations and the probe's own slack.
            fit = int(0.92 * r.max_seconds / sec_per_step)
            total = max(min(target, fit), _PROBE_TO + 1, r.warmup + 1)
            log(f"[{r.name}] {sec_per_step * 1e3:.1f} ms/step: {total} steps (target {target}, fit {fit})")
        if step % eval_every == 0 or step == total:
            valid_loss, _ = evaluate(model, valid_t, ctx, 64, device)
            train_loss = float(loss_acc) / loss_n
            loss_acc.zero_()
            loss_n = 0
            curve.append((step, train_loss, valid_loss))
            elapsed = time.perf_counter() - t_start
            log(
                f"[{r.name}] step {step}/{total} lr {lr_at(step - 1, total, r):.2e} train {train_loss:.4f} "
                f"valid {valid_loss:.4f} ({elapsed:.0f} s, {step * batch * ctx / elapsed:,.0f} tok/s)"
            )
            if valid_loss < best[0]:
                best = (valid_loss, step)
                best_state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t_start
    for h in hooks:
        h.remove()
    return RunResult(
        recipe=r.name,
        params=params,
        steps=total,
        target_steps=target,
        tokens_seen=total * batch * ctx,
        epochs_done=total / steps_per_epoch,
        train_seconds=seconds,
        tokens_per_second=total * batch * ctx / seconds,
        best_step=best[1],
        best_valid_loss=best[0],
        curve=curve,
        state=best_state,
    )


def save_shards(state: dict, out_dir: Path, prefix: str, tied: bool) -> list[str]:
    """bf16 safetensors shards `{prefix}-NN.safetensors` of at most ~12 MiB (the tied head left out)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in keep.items()}
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * 2
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    names = []
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i:02d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
    return names


def load_shards(in_dir: Path, prefix: str) -> dict:
    from safetensors.torch import load_file

    paths = sorted(in_dir.glob(f"{prefix}-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no {prefix}-NN.safetensors shards in {in_dir}")
    state: dict = {}
    for p in paths:
        state.update(load_file(str(p)))
    return state
