"""The learned planner's network (torch): a history encoder, a high-level head and a recurrent
decoder over layers, with the feasibility masks of ``policies/learned.py`` built into the graph.

- **State**: this decision's features (``policies.featurizer``) and an LSTM over the previous K
  decisions' features (the history embedding), plus the privacy prefix, into a context vector.
- **High-level action**: the cut — how many leading layers stay whole on the edge (one of
  ``cut_options``: 0, ¼, ½, ¾ or all of the layers); and the LM head's side.
- **Low-level actions**: a GRU decoder over layers ℓ = 1..L whose input is [layer embedding,
  cut embedding, embedding of layer ℓ−1's decision] and whose state starts from the context. Per
  layer it emits H head bits (edge/cloud) and a 3-way FFN mode: the full 2^H·3 per layer. Heads are
  kept as individual bits rather than per-KV-group counts: the reachable plan set is the full one
  either way, bits need no model-specific output size, and the cost model makes interchangeable
  heads score the same, so the policy learns the symmetry from the rewards.
- **Masks** (never a penalty): a cut link allows only the all-edge cut; the privacy prefix and the
  cut force layers whole onto the edge; the memory budget masks the FFN modes and caps the number
  of edge heads of a layer by the upper bounds of ``memory_inputs`` as the decoder walks the layers.
- **Critics**: two value heads on layers of their own over the same state (the history embedding
  is trained by the policy only), for the penalty and the drift cost streams.

Three modes share one pass: ``sample`` (training rollouts: hard Gumbel-softmax, i.e. Gumbel-max
sampling, so the next layer's input is a one-hot decision), ``greedy`` (argmax: what is exported to
ONNX) and ``evaluate`` (teacher-forced log-probabilities of given actions, for PPO and imitation).
Rollouts run without gradients: PPO's gradient flows through the log-probabilities of the sampled
actions, so the straight-through path of Gumbel-softmax carries no gradient in this trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.featurizer import N_FEATURES
from policies.learned import N_CUTS, cut_options
from policies.segments import ModelDims

__all__ = ["Actions", "PolicyInputs", "PolicyNet", "PolicyOutput"]

Mode = Literal["sample", "greedy", "evaluate"]

_MASKED = -1e9  # a masked logit: exp() is exactly 0 in float32


@dataclass
class PolicyInputs:
    """A batch of decisions' inputs (the ONNX inputs, batched)."""

    features: Tensor  # [B, F]
    history: Tensor  # [B, K, F]
    memory: Tensor  # [B, N_MEMORY]
    min_edge_layers: Tensor  # [B] int64

    def index(self, idx: Tensor) -> PolicyInputs:
        return PolicyInputs(self.features[idx], self.history[idx], self.memory[idx], self.min_edge_layers[idx])


@dataclass
class Actions:
    """A batch of plans as the policy emits them (after its masks)."""

    cut: Tensor  # [B] int64, index into cut_options
    head_cloud: Tensor  # [B, L, H] int64
    ffn_mode: Tensor  # [B, L] int64
    lm_head_cloud: Tensor  # [B] int64

    def index(self, idx: Tensor) -> Actions:
        return Actions(self.cut[idx], self.head_cloud[idx], self.ffn_mode[idx], self.lm_head_cloud[idx])


@dataclass
class PolicyOutput:
    actions: Actions
    log_prob: Tensor  # [B]: of the actions under the masked policy
    entropy: Tensor  # [B]: sum of the entropies of the choices that were free
    value_penalty: Tensor  # [B]
    value_drift: Tensor  # [B]


class PolicyNet(nn.Module):
    def __init__(self, dims: ModelDims, history: int, hidden: int = 64, history_hidden: int = 32) -> None:
        super().__init__()
        if history < 1:
            raise ValueError(f"history must be at least 1 decision, got {history}")
        self.dims = dims
        self.history = history
        self.n_layer, self.n_head = dims.n_layer, dims.n_head
        self.cut_layers: Tensor
        self.register_buffer("cut_layers", torch.tensor(cut_options(dims.n_layer), dtype=torch.int64))
        self.encoder = nn.LSTM(N_FEATURES, history_hidden, batch_first=True)
        self.trunk = nn.Sequential(
            nn.Linear(N_FEATURES + history_hidden + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.cut_head = nn.Linear(hidden, N_CUTS)
        self.lm_head = nn.Linear(hidden, 2)
        # The critics have their own layers (they read the history embedding without training it):
        # their targets can be orders of magnitude off while the queue builds up, and a shared trunk
        # would let those gradients swamp the policy's.
        self.critic = nn.Sequential(
            nn.Linear(N_FEATURES + history_hidden + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.value_penalty = nn.Linear(hidden, 1)
        self.value_drift = nn.Linear(hidden, 1)
        self.layer_embedding = nn.Embedding(dims.n_layer, 16)
        self.cut_embedding = nn.Embedding(N_CUTS, 8)
        # nn.GRU run one step at a time rather than nn.GRUCell: it exports as one ONNX GRU node per layer.
        # The previous layer's decision (H head bits, a one-hot FFN mode) enters the GRU as it is: the
        # GRU's input weights are its embedding, one ONNX node fewer per layer.
        self.decoder = nn.GRU(16 + 8 + dims.n_head + 3, hidden)
        self.layer_out = nn.Linear(hidden, dims.n_head + 3)  # H logits of "this head in the cloud", 3 FFN modes

    def _state(self, x: PolicyInputs) -> Tensor:
        """[features, history embedding, privacy prefix]."""
        sequence = torch.cat([x.history, x.features.unsqueeze(1)], dim=1)
        _, (h, _) = self.encoder(sequence)
        privacy = (x.min_edge_layers.to(torch.float32) / self.n_layer).unsqueeze(1)
        return torch.cat([x.features, h[-1], privacy], dim=1)

    def context(self, x: PolicyInputs) -> Tensor:
        out: Tensor = self.trunk(self._state(x))
        return out

    def _decode_step(self, step_in: Tensor, hidden: Tensor) -> Tensor:
        _, h = self.decoder(step_in.unsqueeze(0), hidden.unsqueeze(0))
        out: Tensor = h.squeeze(0)
        return out

    def _step_input(self, ell: int, cut_emb: Tensor, previous: Tensor) -> Tensor:
        batch = cut_emb.shape[0]
        return torch.cat([self.layer_embedding.weight[ell].expand(batch, -1), cut_emb, previous], dim=1)

    def greedy_unbudgeted(self, x: PolicyInputs) -> Actions:
        """The greedy policy for inputs without a memory budget (``budget_left`` = NO_BUDGET): the same
        actions as ``forward(x, "greedy")`` (a test holds it), without the budget's bookkeeping, which
        is most of the graph — the exported file runs this unless a budget is set."""
        batch = x.features.shape[0]
        ctx = self.context(x)
        link_up = x.features[:, 0] > 0.5
        up = link_up.unsqueeze(1)
        last = torch.zeros(N_CUTS, dtype=torch.bool)
        last[-1] = True
        cut_mask = up | last.unsqueeze(0)
        cut = torch.where(cut_mask, self.cut_head(ctx), torch.full((batch, N_CUTS), _MASKED)).argmax(dim=1)
        forced_by_cut = torch.maximum(self.cut_layers.unsqueeze(0), x.min_edge_layers.unsqueeze(1))
        forced = torch.where(link_up, forced_by_cut.gather(1, cut.unsqueeze(1)).squeeze(1), self.n_layer)
        lm_logits = self.lm_head(ctx)
        lm = ((lm_logits[:, 1] > lm_logits[:, 0]) & link_up).to(torch.int64)
        forced_layers = torch.arange(self.n_layer).unsqueeze(0) < forced.unsqueeze(1)  # [B, L]
        # Shaped for the device, where each ONNX node costs about the same whatever it does: the
        # decoder works on [1, B, ·] tensors throughout (the GRU's own shape), the per-layer inputs
        # and the forced-layer masks are built for all layers at once, and a forced layer is decided
        # by a logit bias (−1e9 on every cloud choice) rather than by a mask after the fact.
        n = self.n_head
        bias = torch.zeros(self.n_layer, 1, batch, n + 3)
        blocked = torch.cat([torch.ones(n), torch.tensor([0.0, 1.0, 1.0])]) * _MASKED  # heads cloud; FFN not edge
        bias = bias + forced_layers.transpose(0, 1).unsqueeze(1).unsqueeze(3).to(torch.float32) * blocked
        static = torch.cat(
            [
                self.layer_embedding.weight.unsqueeze(1).unsqueeze(1).expand(-1, 1, batch, -1),
                self.cut_embedding(cut).unsqueeze(0).unsqueeze(0).expand(self.n_layer, 1, -1, -1),
            ],
            dim=3,
        )  # [L, 1, B, 24]
        arange3 = torch.arange(3)
        hidden = ctx.unsqueeze(0)
        previous = torch.zeros(1, batch, n + 3)
        heads_out, ffn_out = [], []
        for ell in range(self.n_layer):
            _, hidden = self.decoder(torch.cat([static[ell], previous], dim=2), hidden)
            logits = torch.matmul(hidden, self.layer_out.weight.t()) + self.layer_out.bias + bias[ell]
            bits = (logits[:, :, :n] > 0).to(torch.float32)
            ffn = logits[:, :, n:].argmax(dim=2, keepdim=True)  # [1, B, 1]
            heads_out.append(bits)
            ffn_out.append(ffn)
            previous = torch.cat([bits, (ffn == arange3).to(torch.float32)], dim=2)
        head_cloud = torch.cat(heads_out, dim=0).transpose(0, 1).to(torch.int64)
        ffn_mode = torch.cat(ffn_out, dim=0).squeeze(2).transpose(0, 1)
        return Actions(cut, head_cloud, ffn_mode, lm)

    def forward(
        self, x: PolicyInputs, mode: Mode = "greedy", given: Actions | None = None, layer_temperature: float = 1.0
    ) -> PolicyOutput:
        """One pass in `mode`. `layer_temperature` divides the layer decoder's logits: below 1 the
        per-layer choices explore less than the high-level ones (the argmax, and so the exported
        policy, does not change)."""
        if (mode == "evaluate") != (given is not None):
            raise ValueError("actions are given exactly in evaluate mode")
        batch = x.features.shape[0]
        state = self._state(x)
        ctx = self.trunk(state)
        critic = self.critic(state.detach())
        link_up = x.features[:, 0] > 0.5
        mem = x.memory
        budget, lm_bytes, base, head_bytes = mem[:, 0], mem[:, 1], mem[:, 2], mem[:, 3]
        ffn_bytes = torch.stack([mem[:, 4], torch.zeros_like(base), mem[:, 5]], dim=1)  # by ffn_mode
        whole = mem[:, 6]
        log_prob = torch.zeros(batch)
        entropy = torch.zeros(batch)
        choice = _Chooser(mode)

        # The cut: all-edge only when the link is cut; a cut whose forced layers do not fit is masked
        # (if none fits, the smallest stays allowed: no plan fits, the device will say so).
        forced_by_cut = torch.maximum(self.cut_layers.unsqueeze(0), x.min_edge_layers.unsqueeze(1))  # [B, N_CUTS]
        fits = forced_by_cut.to(torch.float32) * whole.unsqueeze(1) <= budget.unsqueeze(1)
        first = torch.zeros(N_CUTS, dtype=torch.bool)
        first[0] = True
        last = torch.zeros(N_CUTS, dtype=torch.bool)
        last[-1] = True
        allowed_up = fits | (first.unsqueeze(0) & ~fits.any(dim=1, keepdim=True))
        up = link_up.unsqueeze(1)
        cut_mask = (up & allowed_up) | (~up & last.unsqueeze(0))  # not torch.where: onnxruntime has no bool Where
        cut, lp, ent = choice.categorical(self.cut_head(ctx), cut_mask, None if given is None else given.cut)
        log_prob, entropy = log_prob + lp, entropy + ent
        forced = torch.where(link_up, forced_by_cut.gather(1, cut.unsqueeze(1)).squeeze(1), self.n_layer)
        left = budget - forced.to(torch.float32) * whole

        # The LM head: the edge when the link is cut; the cloud when the edge has no room for it.
        lm_edge_ok = (lm_bytes <= left) | ~link_up
        lm_mask = torch.stack([lm_edge_ok, link_up], dim=1)
        lm, lp, ent = choice.categorical(self.lm_head(ctx), lm_mask, None if given is None else given.lm_head_cloud)
        log_prob, entropy = log_prob + lp, entropy + ent
        left = left - torch.where(lm == 0, lm_bytes, torch.zeros_like(lm_bytes))

        hidden = ctx
        previous = torch.zeros(batch, self.n_head + 3)
        cut_emb = self.cut_embedding(cut)
        heads_out, ffn_out = [], []
        for ell in range(self.n_layer):
            hidden = self._decode_step(self._step_input(ell, cut_emb, previous), hidden)
            free = ell >= forced  # [B]
            # FFN mode: the cloud needs the link, an edge part needs room for it and the layer's norms.
            room = left.unsqueeze(1) >= base.unsqueeze(1) + ffn_bytes
            split_ok = room[:, 2] & link_up
            edge_ok = room[:, 0] | ~(link_up | split_ok)  # nothing else allowed: the edge, over budget or not
            ffn_mask = torch.stack([edge_ok, link_up, split_ok], dim=1)
            edge_only = torch.tensor([True, False, False]).expand(batch, -1)
            ffn_mask = (free.unsqueeze(1) & ffn_mask) | (~free.unsqueeze(1) & edge_only)
            logits = self.layer_out(hidden) / layer_temperature
            ffn, lp, ent = choice.categorical(
                logits[:, self.n_head :], ffn_mask, None if given is None else given.ffn_mode[:, ell]
            )
            lp_free = torch.where(free, lp, torch.zeros_like(lp))
            log_prob, entropy = log_prob + lp_free, entropy + torch.where(free, ent, torch.zeros_like(ent))
            ffn_cost = ffn_bytes.gather(1, ffn.unsqueeze(1)).squeeze(1)
            # Edge heads fit while base + FFN part + heads ≤ what is left (heads charged their upper bound).
            room_heads = torch.clamp(torch.floor((left - base - ffn_cost) / head_bytes), 0, self.n_head)
            cap = torch.where(link_up, room_heads, torch.full_like(room_heads, self.n_head))
            bits, lp, ent = choice.head_bits(
                logits[:, : self.n_head], cap, None if given is None else given.head_cloud[:, ell]
            )
            bits = torch.where(free.unsqueeze(1), bits, torch.zeros_like(bits))
            log_prob = log_prob + torch.where(free, lp, torch.zeros_like(lp))
            entropy = entropy + torch.where(free, ent, torch.zeros_like(ent))
            n_edge = (1 - bits).sum(dim=1).to(torch.float32)
            on_edge = (n_edge > 0) | (ffn != 1)
            spent = torch.where(on_edge, base + ffn_cost + n_edge * head_bytes, torch.zeros_like(base))
            left = left - torch.where(free, spent, torch.zeros_like(spent))
            heads_out.append(bits)
            ffn_out.append(ffn)
            previous = torch.cat([bits.to(torch.float32), F.one_hot(ffn, 3).to(torch.float32)], dim=1)

        actions = Actions(cut, torch.stack(heads_out, dim=1), torch.stack(ffn_out, dim=1), lm)
        return PolicyOutput(
            actions, log_prob, entropy, self.value_penalty(critic).squeeze(1), self.value_drift(critic).squeeze(1)
        )


class _Chooser:
    """One masked choice in the mode of the pass: sampled (Gumbel-max), argmax, or given."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def categorical(self, logits: Tensor, mask: Tensor, given: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        masked = torch.where(mask, logits, torch.full_like(logits, _MASKED))
        logp = F.log_softmax(masked, dim=-1)
        if given is not None:
            value = given
        elif self.mode == "sample":
            one_hot = F.gumbel_softmax(masked, tau=1.0, hard=True)
            value = one_hot.argmax(dim=-1)
        else:
            value = masked.argmax(dim=-1)
        probs = logp.exp()
        entropy = -(probs * torch.where(mask, logp, torch.zeros_like(logp))).sum(dim=-1)
        return value, logp.gather(-1, value.unsqueeze(-1)).squeeze(-1), entropy

    def head_bits(self, logits: Tensor, cap: Tensor, given: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per head, 1 = cloud. Edge heads beyond `cap` (in head order) are forced to the cloud: a
        head's choice is free only while fewer than `cap` earlier heads are on the edge."""
        if given is not None:
            cloud = given
        elif self.mode == "sample":
            pair = torch.stack([torch.zeros_like(logits), logits], dim=-1)
            cloud = F.gumbel_softmax(pair, tau=1.0, hard=True).argmax(dim=-1)
        else:
            cloud = (logits > 0).to(torch.int64)
        edge = 1 - cloud
        before = torch.cumsum(edge, dim=1) - edge  # edge heads before each head, as chosen
        free = before.to(torch.float32) < cap.unsqueeze(1)
        edge = edge * free.to(torch.int64)
        cloud = 1 - edge
        logp_cloud = F.logsigmoid(logits)
        logp_edge = F.logsigmoid(-logits)
        logp = torch.where(cloud == 1, logp_cloud, logp_edge)
        entropy = -(logp_cloud.exp() * logp_cloud + logp_edge.exp() * logp_edge)
        return (
            cloud,
            torch.where(free, logp, torch.zeros_like(logp)).sum(dim=1),
            torch.where(free, entropy, torch.zeros_like(entropy)).sum(dim=1),
        )
