"""One captured attention call: probabilities now, or the queries and keys to compute them in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_attn.capture.probs import attention_probs, attention_scores
from lightning_attn.capture.workspace import Buffer


@dataclass(frozen=True)
class SiteInfo:
    """What the recorder knows of an attention site.

    Attributes:
        name: module path of the calling module (wrappers stripped), ``#k`` appended for the k-th
            repeated call within one forward pass.
        kind: ``"cross"`` when the call attended to another sequence than its queries' (an
            ``encoder_hidden_states``/``key_value_states``/``memory`` argument, keys from another tensor,
            an ``is_cross_attention`` module), else ``"self"`` (also a decoding step: 1 query, many keys).
        num_heads: the module's query heads (grouped-query attention, packed heads unfolded).
        num_queries: query length.
        num_keys: key length.
        module_type: class name of the module that made the call.
        source: backend that captured it: ``"sdpa"``, ``"mha"``, ``"mha_fastpath"``,
            ``"encoder_fastpath"``, ``"weights"`` (a module that returned its weights) or ``"softmax"``
            (hand-written attention).
    """

    name: str
    kind: Literal["self", "cross"]
    num_heads: int
    num_queries: int
    num_keys: int
    module_type: str
    source: str


@dataclass
class AttentionCapture:
    """The attention of one call of one site, exact and lazily materialized.

    Either ``weights`` holds the probabilities (modules that return them) or ``query``/``key`` and
    the masking arguments do, so that consumers can reduce long sequences in query chunks
    (:meth:`chunks`) without ever holding ``[batch, heads, L, L]``.
    """

    info: SiteInfo
    weights: Tensor | None = None
    query: Tensor | None = None
    key: Tensor | None = None
    attn_mask: Tensor | None = None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    mask_true_means_masked: bool = False
    _cache: Tensor | None = field(default=None, repr=False)
    _scores_cache: Tensor | None = field(default=None, repr=False)
    _masked_score: float = field(default=float("-inf"), repr=False)
    _borrowed: bool = field(default=False, repr=False)
    #: Results computed from this call, shared by every capture of the same call (the statistics engine's
    #: per-row statistics), so that several callbacks recording one forward compute them once.
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def site(self) -> str:
        return self.info.name

    def probs(self) -> Tensor:
        """All probabilities, ``[batch, heads, queries, keys]`` float32 (computed once, then cached); a tensor the
        caller may keep."""
        if self._cache is None:
            self._cache = self.weights if self.weights is not None else self._compute(None)
        elif self._borrowed:  # the statistics engine's buffer, reused at its next call: keep a copy from now on
            self._cache, self._borrowed = self._cache.clone(), False
        return self._cache

    def probs_in_call(self) -> Tensor:
        """All probabilities without a copy, valid while the consumer handles this capture (as :meth:`chunks`);
        :meth:`probs` gives a tensor to keep."""
        return self._cache if self._cache is not None else self.probs()

    def chunks(self, chunk_size: int | None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(first_query_index, probs[:, :, rows, :])`` for consecutive query chunks, valid while the consumer
        handles this capture (copy what must outlive it).

        ``chunk_size=None`` (or a chunk at least as long as the queries) yields everything at once.
        """
        num_queries = self.info.num_queries
        if self._cache is not None or chunk_size is None or chunk_size >= num_queries:
            yield 0, self.probs_in_call()
            return
        for start in range(0, num_queries, chunk_size):
            rows = slice(start, min(start + chunk_size, num_queries))
            if self.weights is not None:
                yield start, self.weights[..., rows, :]
            else:
                yield start, self._compute(rows)

    def _compute(self, rows: slice | None) -> Tensor:
        assert self.query is not None and self.key is not None
        probs = attention_probs(
            self.query,
            self.key,
            self.attn_mask,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
            query_slice=rows,
            mask_true_means_masked=self.mask_true_means_masked,
        )
        return as_bhqk(probs)

    def scores(
        self,
        rows: slice | None = None,
        cols: slice | None = None,
        masked_score: float = float("-inf"),
        out: Buffer | None = None,
    ) -> Tensor | None:
        """The masked, scaled scores ``[batch, heads, rows, cols]`` (``masked_score`` where masked) whose row
        softmax over all keys gives :meth:`probs`; ``None`` when the capture holds weights (no scores exist).
        ``out(shape, device)`` gives the tensor to write them to (a reusable buffer)."""
        if self.query is None or self.key is None:
            return None
        scores = attention_scores(
            self.query,
            self.key,
            self.attn_mask,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
            query_slice=rows,
            key_slice=cols,
            mask_true_means_masked=self.mask_true_means_masked,
            masked_score=masked_score,
            out=out,
        )
        return as_bhqk(scores)

    def adopt_probs(
        self,
        probs: Tensor,
        scores: Tensor | None = None,
        masked_score: float = float("-inf"),
        borrowed: bool = False,
    ) -> None:
        """Cache all probabilities ``[batch, heads, queries, keys]`` computed from :meth:`scores` (the statistics
        engine's softmax, or the ``exact_outputs=False`` path's), so that :meth:`probs` and :meth:`chunks` do not
        compute them again; ``scores`` (masked with ``masked_score``) are handed on to :meth:`take_scores`.
        ``borrowed``: ``probs`` is a buffer its owner reuses after this capture is released, so :meth:`probs` copies
        it before handing it out (:meth:`chunks`, used during the call, does not)."""
        if self._cache is None:
            self._cache, self._borrowed = probs, borrowed
        if scores is not None and self._scores_cache is None:
            self._scores_cache, self._masked_score = scores, masked_score

    def take_scores(self, masked_score: float) -> Tensor | None:
        """The scores of all rows cached by :meth:`adopt_probs` with this ``masked_score``, handed over: the cache
        forgets them, so the caller may overwrite them."""
        if self._scores_cache is None or self._masked_score != masked_score:
            return None
        scores, self._scores_cache = self._scores_cache, None
        return scores

    @property
    def has_probs(self) -> bool:
        """Whether all probabilities are at hand (weights, or cached) without computing anything."""
        return self._cache is not None or self.weights is not None

    def share_cache_from(self, others: list[AttentionCapture]) -> None:
        """Adopt probabilities another capture of the same call already computed, and the call's memo."""
        if others:
            self.memo = others[0].memo
        cached = next((other for other in others if other._cache is not None), None)
        if cached is not None and self._cache is None:
            self._cache, self._borrowed = cached._cache, cached._borrowed
            self._scores_cache, self._masked_score = cached._scores_cache, cached._masked_score

    def release(self) -> None:
        """Drop every tensor reference (the recorder calls this after the consumer returns)."""
        self.weights = self.query = self.key = self.attn_mask = self._cache = self._scores_cache = None
        self.memo = {}


def as_bhqk(probs: Tensor) -> Tensor:
    """Reshape ``[..., L, S]`` probabilities to ``[batch, heads, L, S]`` (unbatched inputs get batch 1)."""
    if probs.dim() == 2:
        return probs[None, None]
    if probs.dim() == 3:
        return probs[None]
    if probs.dim() > 4:
        return probs.flatten(0, probs.dim() - 4)
    return probs


def pad_nested_probs(per_sample: list[Tensor], length: int) -> Tensor:
    """Stack per-sample ``[H, Li, Li]`` maps into ``[B, H, length, length]``, zeros beyond each ``Li``."""
    heads = per_sample[0].shape[0]
    out = per_sample[0].new_zeros(len(per_sample), heads, length, length)
    for index, probs in enumerate(per_sample):
        n = probs.shape[-1]
        out[index, :, :n, :n] = probs
    return out


def float32_detached(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.float32)
