"""Task-conditioned Mixture-of-Experts MLP for the last blocks of a ViT (M2DINO, Wang et al. 2026).

A block's MLP is replaced by E experts, each a copy of that MLP (sparse upcycling, Komatsuzaki et
al. 2023), so the pretrained function is kept at step 0: top-k gate weights are renormalised to
sum to one, and identical experts give back the MLP's own output. A router picks the top-k
experts from

- ``task``: the task embedding only (as in task-level MoE, Kudugunta et al. 2021): every token of
  a single-task batch goes to the same experts, so each chosen expert runs once on the whole
  batch (no gather/scatter at all);
- ``token``: the token itself (a plain MoE, no task conditioning);
- ``task_token``: both, concatenated.

With token-dependent routing, tokens are grouped per expert with ``index_select`` / ``index_add_``
(a loop over the E experts, never over tokens).

Auxiliary load-balancing loss (Switch Transformer, Fedus et al. 2022): ``E * sum_e f_e P_e`` with
f_e the share of token-slots sent to expert e and P_e its mean router probability. With task-only
routing a single batch has one task, so the loss is taken over the routing of *all* tasks (each
task weighted equally): it spreads the tasks over the experts without forcing a task to spread
its own load.

The routing context (which task each sample is, the task embedding table) is set on the layer
by the owning model before each forward (:meth:`TaskMoE.set_context`), because timm's blocks call
``mlp(x)`` with the tokens only.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

Routing = Literal["task", "token", "task_token"]


class TaskMoE(nn.Module):
    """E upcycled copies of an MLP behind a top-k router."""

    def __init__(
        self,
        mlp: nn.Module,
        dim: int,
        num_experts: int,
        top_k: int,
        routing: Routing,
        task_embed_dim: int,
        num_tasks: int,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(num_experts))
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = routing
        in_dim = {"task": task_embed_dim, "token": dim, "task_token": task_embed_dim + dim}[routing]
        self.router = nn.Linear(in_dim, num_experts)
        # random (not zero) logits: distinct tasks start on distinct experts, and the ties of a
        # zero router would send every task to experts 0..k-1 for ever (identical experts give
        # the router no gradient)
        nn.init.normal_(self.router.weight, std=in_dim**-0.5)
        nn.init.zeros_(self.router.bias)
        self.register_buffer("load", torch.zeros(num_tasks, num_experts), persistent=True)
        self.aux_loss = torch.zeros(())
        self._task_ids: torch.Tensor | None = None  # (B,)
        self._table: torch.Tensor | None = None  # (T, D_task)

    def set_context(self, task_ids: torch.Tensor, task_table: torch.Tensor | None) -> None:
        """Which task each sample of the next forward is ((B,) long) and the (T, D) embeddings."""
        self._task_ids = task_ids
        self._table = task_table

    def reset_load(self) -> None:
        self.load.zero_()

    def _gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs, top-k weights renormalised, top-k indices) of router logits (..., E)."""
        probs = logits.softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # renormalising one weight gives exactly 1 and no router gradient: keep the value 1
            # (the upcycled identity) with the gradient of p, as Switch's p * expert(x) has
            return probs, weights / weights.detach(), indices
        return probs, weights / weights.sum(dim=-1, keepdim=True), indices

    def _switch_loss(self, probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """E * sum_e f_e P_e over rows of probs (R, E) and their top-k indices (R, k)."""
        counts = torch.zeros_like(probs).scatter_(1, indices, 1.0)
        f = counts.mean(dim=0) / self.top_k
        return self.num_experts * (f.detach() * probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C)
        if self._task_ids is None:
            raise RuntimeError("TaskMoE needs set_context(task_ids, table) before forward")
        task_ids = self._task_ids
        batch, tokens, _ = x.shape
        single_task = bool((task_ids == task_ids[0]).all())
        if self.routing == "task":
            assert self._table is not None
            all_probs, _, all_idx = self._gates(self.router(self._table))  # (T, E), (T, k)
            self.aux_loss = self._switch_loss(all_probs, all_idx)
            if single_task:
                return self._forward_single(x, task_ids[0])
            context = self._table[task_ids][:, None, :].expand(batch, tokens, -1)  # (B, N, D)
        elif self.routing == "token":
            context = x
        else:
            assert self._table is not None
            context = torch.cat([self._table[task_ids][:, None, :].expand(batch, tokens, -1), x], dim=-1)
        return self._forward_tokens(x, context, task_ids)

    def _forward_single(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Task-only routing, one task: each chosen expert runs once on the whole batch."""
        assert self._table is not None
        _, weights, indices = self._gates(self.router(self._table[task]))  # (k,), (k,)
        if self.training:
            with torch.no_grad():
                self.load[task, indices] += x.shape[0] * x.shape[1]
        out = None
        for w, e in zip(weights, indices.tolist(), strict=True):
            y = w * self.experts[e](x)
            out = y if out is None else out + y
        return out

    def _forward_tokens(self, x: torch.Tensor, context: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Per-token routing: tokens grouped per expert (gather, run, weighted scatter-add)."""
        batch, tokens, channels = x.shape
        flat = x.reshape(-1, channels)  # (BN, C)
        probs, weights, indices = self._gates(self.router(context.reshape(batch * tokens, -1)))  # (BN, E|k)
        if self.routing != "task":
            self.aux_loss = self._switch_loss(probs, indices)
        token_task = task_ids.repeat_interleave(tokens)  # (BN,)
        if self.training:
            with torch.no_grad():
                flat_idx = (token_task[:, None] * self.num_experts + indices).reshape(-1)
                self.load.view(-1).index_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=self.load.dtype))
        out = torch.zeros_like(flat)
        for e in range(self.num_experts):
            rows, slot = (indices == e).nonzero(as_tuple=True)  # tokens sent to e, and in which slot
            if rows.numel() == 0:
                continue
            y = self.experts[e](flat.index_select(0, rows))  # (n_e, C)
            out.index_add_(0, rows, y * weights[rows, slot][:, None])
        return out.reshape(batch, tokens, channels)


def load_share(load: torch.Tensor) -> torch.Tensor:
    """Rows of an expert-load table (T, E) as shares (rows summing to 1; zero rows stay zero)."""
    total = load.sum(dim=1, keepdim=True)
    return torch.where(total > 0, load / total.clamp_min(1e-12), torch.zeros_like(load))


__all__ = ["Routing", "TaskMoE", "load_share"]
