"""Arguments that name something in the batch or the model, checked at the first evaluation batch of each stage (the
sanity check's, when it runs; :meth:`~lightning_attn.callbacks.base.EvaluationCallback.first_batch_start`), so that a
misspelt name fails in seconds instead of being ignored, or failing after a training epoch, with one message naming
each wrong value and the valid names close to it (:func:`~lightning_attn.capture.site_names.close_names`).

One :class:`FirstBatchCheck` serves every callback: its batch keys and ``save_dir`` before the step, its site
patterns (``include``, ``exclude`` and other arguments naming sites, :func:`site_naming_arguments`) after it, against
the attention sites that ran (a census: a recorder of every site, nothing computed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_attn.capture.recorder import AttentionRecorder, close_recorder, open_recorder, site_selected
from lightning_attn.capture.site_names import close_names, sites_matching
from lightning_attn.metrics.attention_epoch import TokenNames, label_pattern
from lightning_attn.metrics.batch_context import batch_paths, lookup

__all__ = ["FirstBatchCheck", "batch_key_problems", "site_naming_arguments", "site_problems"]


def batch_key_problems(batch: Any, keys: Mapping[str, str], token_maps: Mapping[str, str] | None = None) -> list[str]:
    """One line per argument (``keys`` and ``token_maps``: argument -> batch key or dotted path) that ``batch`` does not
    have, with the close batch keys; ``token_maps`` must also give a ``[B, L]`` tensor (they are per token)."""
    paths = batch_paths(batch)
    sequence = isinstance(batch, (list, tuple))
    problems = []
    per_token = dict(token_maps or {})
    for argument, key in {**keys, **per_token}.items():
        try:
            value = lookup(batch, key)
        except KeyError:
            hint = close_names(key, paths, "batch keys")
            if sequence:
                hint += f"; the batch is a {type(batch).__name__}: name an element by its index ('0', '1.ids')"
            problems.append(f"{argument}={key!r} is not in the batch ({hint})")
            continue
        if argument in per_token and value is not None and torch.as_tensor(value).dim() != 2:
            shape = tuple(torch.as_tensor(value).shape)
            problems.append(f"{argument}={key!r} gives shape {shape}, not the [batch, tokens] it needs")
    return problems


def site_naming_arguments(
    modality_pairs: Mapping[str, tuple[str, str]], token_names: TokenNames | None
) -> list[tuple[str, str]]:
    """``(argument, site pattern)`` of the AttentionLogger's arguments that name sites besides ``include``/``exclude``:
    each side of ``modality_pairs``, the site glob of each ``token_names`` key.

    >>> site_naming_arguments({"p": ("a", "b")}, {"enc.*:keys": ["x"]})[1:]
    [("modality_pairs['p'] B->A site 'b'", 'b'), ("token_names key 'enc.*:keys'", 'enc.*')]
    """
    named = [
        (f"modality_pairs[{pair!r}] {direction} site {pattern!r}", pattern)
        for pair, patterns in modality_pairs.items()
        for direction, pattern in zip(("A->B", "B->A"), patterns, strict=True)
    ]
    if isinstance(token_names, Mapping):
        named += [(f"token_names key {key!r}", label_pattern(str(key))[0]) for key in token_names]
    return named


def site_problems(
    sites: Sequence[str],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    named: Sequence[tuple[str, str]] = (),
    model: str = "the model",
) -> tuple[list[str], list[str]]:
    """``(errors, unused)``: the ``include`` patterns that match none of ``sites`` (the attention sites that ran; a
    repeated call ``name#k`` answers to ``name``) and the ``named`` arguments (``(argument, pattern)``) that match no
    site kept by ``include``/``exclude``; the ``exclude`` patterns that match no site of ``model`` (its class name). One
    line each, with the close site names.

    >>> site_problems(["enc.0", "dec.0"], ["encd.*"], ["dec.1"])[0]
    ["include pattern 'encd.*' matches no attention site (close site names: 'enc.0')"]
    """
    errors = [
        f"include pattern {pattern!r} matches no attention site ({close_names(pattern, sites)})"
        for pattern in include or ()
        if not sites_matching(pattern, sites)
    ]
    unused = [
        f"exclude pattern {pattern!r} matches no attention site of {model}, so it excludes nothing "
        f"({close_names(pattern, sites)})"
        for pattern in exclude or ()
        if not sites_matching(pattern, sites)
    ]
    kept = [site for site in sites if site_selected(site, include, exclude)]
    for argument, pattern in named:
        if sites_matching(pattern, kept):
            continue
        left_out = sites_matching(pattern, sites)
        if left_out:
            errors.append(f"{argument} names only sites that include/exclude leave out: {left_out}")
        else:
            errors.append(f"{argument} matches no attention site ({close_names(pattern, kept or sites)})")
    return errors, unused


class FirstBatchCheck:
    """The checks of one callback's name-like arguments at the first batch of a stage: its batch keys and ``save_dir``
    before the step (:meth:`start`), its site patterns after it (:meth:`finish`: the sites are those of the attention
    that ran, recorded by a census recorder with no filter).

    Args:
        owner: the callback, as its messages name it.
        include: glob patterns of sites to keep: one that matches no site that ran is an error.
        exclude: glob patterns of sites to leave out: one that matches no site that ran is a warning.
        named: other arguments naming sites, ``(argument, pattern)`` (:func:`site_naming_arguments`): one that
            matches no site kept by ``include``/``exclude`` is an error.
        keys: argument -> the batch key (or dotted path) it names, which the batch must have.
        token_maps: the same for per-token ``[B, L]`` tensors.
        save_dir: the output directory: an existing file there is an error.
        exact_outputs: the census recorder's (:class:`~lightning_attn.AttentionRecorder`).

    Raises:
        ValueError: at the first batch, one for all the wrong names found there.

    Example:
        >>> check = FirstBatchCheck("Tracker", token_maps={"token_ids_key": "ids"})
        >>> try:
        ...     check.start(nn.Identity(), {"idz": [[1, 2]]}, "validate")
        ... except ValueError as error:
        ...     print(str(error).split(": ", 1)[1].split(". ")[0])
        token_ids_key='ids' is not in the batch (close batch keys: 'idz', 'idz.0')
    """

    def __init__(
        self,
        owner: str,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        named: Sequence[tuple[str, str]] = (),
        keys: Mapping[str, str] | None = None,
        token_maps: Mapping[str, str] | None = None,
        save_dir: Path | None = None,
        exact_outputs: bool = True,
    ) -> None:
        self.owner, self.include, self.exclude, self.named = owner, include, exclude, list(named)
        self.keys, self.token_maps = dict(keys or {}), dict(token_maps or {})
        self.save_dir, self.exact_outputs = save_dir, exact_outputs
        self._census: AttentionRecorder | None = None

    def start(self, model: nn.Module, batch: Any, stage: str) -> None:
        """Before the first step of ``stage``: check the batch keys and ``save_dir``, start the census of the sites."""
        problems = batch_key_problems(batch, self.keys, self.token_maps)
        if self.save_dir is not None and self.save_dir.exists() and not self.save_dir.is_dir():
            problems.append(f"save_dir={str(self.save_dir)!r} is a file, not a directory")
        if problems:
            raise ValueError(
                f"{self.owner}, at the first {stage} batch: {'; '.join(problems)}. Batch keys are keys of the batch or "
                "dotted paths into it ('meta.dist', '0.ids')."
            )
        self.abort()
        self._census = open_recorder(model, lambda capture: None, exact_outputs=self.exact_outputs)

    def finish(self, model: nn.Module, stage: str) -> None:
        """After the first step of ``stage``: check the site arguments against the attention sites that ran (none ran:
        nothing to check, the analysing recorders warn)."""
        census, self._census = self._census, None
        if census is None:
            return
        close_recorder(census, quiet=True)
        sites = list(census.sites)
        if not sites:
            return
        model_name = type(model).__name__
        errors, unused = site_problems(sites, self.include, self.exclude, self.named, model_name)
        for line in unused:
            rank_zero_warn(f"{self.owner}: {line}", category=UserWarning)
        if errors:
            raise ValueError(
                f"{self.owner}, at the first {stage} batch: {'; '.join(errors)}. The attention sites of {model_name} "
                f"at the first batch: {', '.join(repr(site) for site in sites)} (names and fnmatch globs over them "
                "are accepted; '*' matches across dots)."
            )

    def abort(self) -> None:
        """Stop the census (the loop raised)."""
        census, self._census = self._census, None
        close_recorder(census, quiet=True)
