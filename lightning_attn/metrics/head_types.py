"""Head-type scores: TransformerLens head-detector patterns streamed as numerator and denominator sums."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_attn.capture.record import as_bhqk
from lightning_attn.functional.attention import diagonal_mass
from lightning_attn.metrics._sites import SiteSums

#: Pattern scores streamed by :class:`HeadTypeScores`.
TYPE_SCORES: tuple[str, ...] = ("previous_token", "duplicate_token", "induction")


def token_patterns(
    tokens: Tensor, query_offset: int = 0, num_rows: int | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rows ``query_offset ... query_offset + num_rows`` of the duplicate-token and induction patterns.

    Exactly TransformerLens ``head_detector``'s patterns (and
    :func:`~lightning_attn.functional.duplicate_token_pattern` / :func:`~lightning_attn.functional.induction_pattern`),
    built per query chunk so that no ``[B, L, L]`` tensor is needed:

    - duplicate: ``P[i, j] = 1`` iff ``tok_i == tok_j`` and ``j < i``;
    - induction: ``P[i, j] = 1`` iff ``tok_i == tok_{j-1}`` and ``1 <= j <= i``.

    Args:
        tokens: ``[B, L]`` token ids.
        valid: optional ``[B, L]`` bool (True = real token): pairs involving a padding position are 0.

    Returns:
        Two ``[B, q, L]`` bool tensors.
    """
    length = tokens.shape[-1]
    num_rows = length - query_offset if num_rows is None else num_rows
    rows = tokens[:, query_offset : query_offset + num_rows]
    query_index = torch.arange(query_offset, query_offset + rows.shape[1], device=tokens.device)[:, None]
    key_index = torch.arange(length, device=tokens.device)[None, :]
    duplicate = (rows[:, :, None] == tokens[:, None, :]) & (key_index < query_index)
    shifted = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)  # shifted[j] = tok_{j-1} (j >= 1)
    induction = (rows[:, :, None] == shifted[:, None, :]) & (key_index >= 1) & (key_index <= query_index)
    if valid is not None:
        valid = valid.to(torch.bool)
        pair = valid[:, query_offset : query_offset + rows.shape[1], None] & valid[:, None, :]
        duplicate = duplicate & pair
        induction = induction & pair
    return duplicate, induction


class HeadTypeScores(SiteSums):
    """Per-site, per-head TransformerLens head-detector scores, streamed over an epoch.

    For each pattern ``P`` of :data:`TYPE_SCORES` the score of a head is (TransformerLens
    ``transformer_lens/head_detector.py``, ``error_measure="mul"``)::

        score = sum_{b, i, j} A[b, h, i, j] P[b, i, j] / sum_{b, i, j} A[b, h, i, j]

    summed over every sample ``b`` of the epoch (TransformerLens averages per-sequence scores instead; the
    ratio of sums is what sum-reduced states can give exactly under DDP and gives long sequences their
    weight). Patterns: previous token ``P[i, i-1] = 1``; duplicate token and induction from token ids
    (:func:`token_patterns`), only for batches that carry them. Scores are defined for self-attention maps
    (``Q == K``); other sites keep NaN.

    State: one sum-reduced ``[2, 3, H]`` tensor per site, numerators then denominators.

    Args:
        exclude_bos: zero key 0 of ``A`` before both sums (TransformerLens ``exclude_bos``).
        exclude_current_token: zero the diagonal of ``A`` before both sums (``exclude_current_token``).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, exclude_bos: bool = False, exclude_current_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exclude_bos = bool(exclude_bos)
        self.exclude_current_token = bool(exclude_current_token)

    @property
    def excludes(self) -> bool:
        """Whether keys are zeroed before the sums (then scores are read off the maps, not the engine's rows)."""
        return self.exclude_bos or self.exclude_current_token

    def register(self, site: str, num_heads: int, device: torch.device) -> Tensor:
        """The state of ``site`` (created on first sight)."""
        return self._site_state(site, (2, len(TYPE_SCORES), num_heads), device, size=num_heads)

    def update(
        self,
        site: str,
        probs: Tensor,
        query_offset: int = 0,
        tokens: Tensor | None = None,
        row_weight: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add one square map or query chunk ``[B, H, q, L]`` (rows ``query_offset ...``).

        Args:
            tokens: ``[B, L]`` token ids for the duplicate and induction patterns (``None``: those are skipped).
            row_weight: ``[B, q]`` weights of the query rows of the chunk (0 leaves a padding row out).
            valid: ``[B, L]`` bool, True = real token: padding positions never match a token pattern.
        """
        probs = as_bhqk(probs)
        rows, keys = probs.shape[-2:]
        attn = probs.float()
        if self.exclude_bos or self.exclude_current_token:
            drop = torch.zeros(rows, keys, dtype=torch.bool, device=probs.device)
            if self.exclude_bos:
                drop[:, 0] = True
            if self.exclude_current_token:
                drop |= (torch.arange(rows, device=probs.device)[:, None] + query_offset) == torch.arange(
                    keys, device=probs.device
                )
            attn = attn.masked_fill(drop, 0)
        weight = None if row_weight is None else row_weight.to(attn.dtype)[:, None, :]  # [B, 1, q]
        total = attn.sum(-1)  # [B, H, q]
        previous = diagonal_mass(attn, -1, query_offset)
        if weight is not None:
            total, previous = total * weight, previous * weight
        self.add_sums(
            site, previous.sum(-1), total.sum(-1), self.pattern_sums(attn, query_offset, tokens, row_weight, valid)
        )

    @staticmethod
    def pattern_sums(
        probs: Tensor,
        query_offset: int,
        tokens: Tensor | None,
        row_weight: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``sum_{i, j} A_ij P_ij`` per sample and head (``[B, H]`` each) of a chunk ``[B, H, q, L]`` for the
        duplicate-token and induction patterns (:func:`token_patterns`); ``None`` without ``tokens``."""
        if tokens is None:
            return None
        attn = probs.float()
        batch, heads = attn.shape[:2]
        patterns = torch.stack(token_patterns(tokens, query_offset, attn.shape[-2], valid), 1).to(attn.dtype)
        if row_weight is not None:
            patterns = patterns * row_weight.to(attn.dtype)[:, None, :, None]
        # one batched matrix product [H, q L] @ [q L, 2] per sample reads the map once for both patterns
        # (several times faster on CPU than a masked product and sum per pattern)
        on_pattern = torch.bmm(attn.reshape(batch, heads, -1), patterns.reshape(batch, 2, -1).transpose(1, 2))
        return on_pattern[..., 0], on_pattern[..., 1]

    def add_sums(self, site: str, previous: Tensor, total: Tensor, patterns: tuple[Tensor, Tensor] | None) -> None:
        """Add per-sample sums ``[B, H]``: the previous-token mass, the total mass (``sum A``) and
        :meth:`pattern_sums` (``None``: no token ids, the token patterns are skipped)."""
        state = self.register(site, total.shape[1], total.device)
        zeros = torch.zeros_like(total)
        if patterns is not None:
            numerators, denominators = [previous, *patterns], [total, total, total]
        else:
            numerators, denominators = [previous, zeros, zeros], [total, zeros, zeros]
        # per-sample float32 values, summed over samples in the state's float64
        state += torch.stack([torch.stack(numerators), torch.stack(denominators)]).to(state.dtype).sum(2)

    def compute(self) -> dict[str, Tensor]:
        """``{site: [3, H]}`` scores in :data:`TYPE_SCORES` order; NaN where nothing was added."""
        results = {}
        for site, state in self._site_states():
            results[site] = torch.where(
                state[1] > 0, state[0] / state[1].clamp_min(torch.finfo(state.dtype).tiny), torch.nan
            )
        return results
