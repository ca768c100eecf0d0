"""Cross-attention agreement: :class:`ModalityAgreement` (a metric) and :class:`PairBuffer`, which pairs the two
directions of a declared modality pair within one forward pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_attn.functional.attention import modality_agreement
from lightning_attn.metrics._sites import SiteSums


class ModalityAgreement(SiteSums):
    """Mean per-sample agreement of declared cross-attention pairs, streamed.

    For a pair ``(A->B, B->A)`` of head-averaged maps ``[B, La, Lb]`` and ``[B, Lb, La]``, each sample's
    agreement is the Pearson correlation of ``A->B`` with ``(B->A)^T``
    (:func:`~lightning_attn.functional.modality_agreement`, in ``[-1, 1]``); states are the sum over samples
    and the sample count, per pair.
    """

    higher_is_better = True  # type: ignore[assignment]  # SiteSums leaves it None (most sums have no direction)

    @property
    def pairs(self) -> list[str]:
        return list(self._state_names)

    def update(self, pair: str, a_to_b: Tensor, b_to_a: Tensor) -> None:
        """Add the samples of one batch: ``a_to_b`` ``[B, La, Lb]``, ``b_to_a`` ``[B, Lb, La]`` (heads averaged)."""
        state = self._site_state(pair, (2,), a_to_b.device, prefix="pair")
        agreement = modality_agreement(a_to_b, b_to_a).to(state.dtype)  # [B]
        state += torch.stack(
            [agreement.sum(), torch.full((), agreement.numel(), dtype=state.dtype, device=state.device)]
        )

    def compute(self) -> dict[str, Tensor]:
        """``{pair: mean agreement}`` (NaN for a pair with no sample)."""
        return {pair: state[0] / state[1] for pair, state in self._site_states()}


class PairBuffer:
    """Holds the head-averaged map of one direction of a declared pair until the other direction arrives in
    the same forward pass, then hands both over (and forgets them): at most one map per pair is held.

    Args:
        pairs: ``{pair_name: (a_to_b_site, b_to_a_site)}``; site names or glob patterns.
    """

    def __init__(self, pairs: Mapping[str, Sequence[str]]) -> None:
        from lightning_attn.capture.recorder import matches

        self._matches = matches
        for name, sites in pairs.items():
            if len(sites) != 2:
                raise ValueError(f"modality pair {name!r} needs two sites (A->B, B->A), got {sites!r}")
        self.pairs = {str(name): (str(sites[0]), str(sites[1])) for name, sites in pairs.items()}
        self._roles: dict[str, list[tuple[str, int]]] = {}
        self.resolved: dict[str, list[str | None]] = {name: [None, None] for name in self.pairs}
        self._pending: dict[str, list[Tensor | None]] = {}

    def roles(self, site: str) -> list[tuple[str, int]]:
        """``[(pair, 0 for A->B | 1 for B->A)]`` of a site; a glob binds to the first site that matches."""
        cached = self._roles.get(site)
        if cached is None:
            cached = []
            for name, sites in self.pairs.items():
                for role, pattern in enumerate(sites):
                    bound = self.resolved[name][role]
                    if bound == site or (bound is None and (pattern == site or self._matches(site, [pattern]))):
                        self.resolved[name][role] = site
                        cached.append((name, role))
            self._roles[site] = cached
        return cached

    def add(self, pair: str, role: int, head_mean: Tensor) -> tuple[Tensor, Tensor] | None:
        """Store one direction; return ``(a_to_b, b_to_a)`` once both are there."""
        pending = self._pending.setdefault(pair, [None, None])
        pending[role] = head_mean
        a_to_b, b_to_a = pending
        if a_to_b is not None and b_to_a is not None:
            del self._pending[pair]
            if a_to_b.shape[0] != b_to_a.shape[0] or a_to_b.shape[1:] != b_to_a.shape[1:][::-1]:
                raise ValueError(
                    f"modality pair {pair!r}: A->B map {tuple(a_to_b.shape)} and B->A map {tuple(b_to_a.shape)} "
                    "are not transposes of each other ([B, La, Lb] and [B, Lb, La])"
                )
            return a_to_b, b_to_a
        return None

    def sites(self) -> dict[str, tuple[str, str]]:
        """Each pair's two sites: the site each side bound to, else its declared name or pattern."""
        return {name: (self.resolved[name][0] or a, self.resolved[name][1] or b) for name, (a, b) in self.pairs.items()}

    def clear(self) -> None:
        """Forget unmatched maps (end of a batch)."""
        self._pending.clear()
