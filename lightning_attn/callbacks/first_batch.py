"""Arguments that name something in the batch or the model, checked at the first evaluation batch of each stage (the
sanity check's, when it runs), so that a misspelt name fails in seconds instead of being ignored, or failing after a
training epoch, with one message naming each wrong value and the valid names close to it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_attn.callbacks.base import close_recorder
from lightning_attn.capture.recorder import AttentionRecorder, matches
from lightning_attn.metrics.batch_context import batch_paths, lookup

__all__ = ["FirstBatchCheck", "batch_key_problems", "close_names", "site_pattern_problems"]


def close_names(value: str, names: Sequence[str], what: str) -> str:
    """A hint for a wrong ``value``: the ``names`` close to it (``difflib.get_close_matches``), else the first few.

    >>> close_names("tcc", ["ttc", "dist"], "batch keys")
    "close batch keys: 'ttc'"
    """
    close = difflib.get_close_matches(value, names, n=6, cutoff=0.5)
    if close:
        return f"close {what}: " + ", ".join(repr(name) for name in close)
    if not names:
        return f"there are no {what}"
    listed = ", ".join(repr(name) for name in names[:8]) + (", ..." if len(names) > 8 else "")
    return f"no close {what}; the {what} are {listed}"


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


def site_pattern_problems(
    include: Sequence[str] | None, exclude: Sequence[str] | None, sites: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The ``include`` and the ``exclude`` glob patterns that match none of ``sites`` (the attention sites that ran;
    ``name#k``, the k-th call of a site, also answers to ``name``), one line each with the close site names."""
    names = sorted({*sites, *(site.split("#")[0] for site in sites)})

    def unmatched(argument: str, patterns: Sequence[str] | None) -> list[str]:
        return [
            f"{argument} pattern {pattern!r} matches no attention site ({close_names(pattern, names, 'site names')})"
            for pattern in patterns or ()
            if not any(matches(name, [pattern]) for name in names)
        ]

    return unmatched("include", include), unmatched("exclude", exclude)


class FirstBatchCheck:
    """The checks of one callback's name-like arguments, at the first batch of each stage it runs in: its batch keys
    and ``save_dir`` before the step (:meth:`batch_start`), its site patterns after it (:meth:`batch_end`: the sites
    are those of the attention that ran, recorded by a recorder with no filter).

    Args:
        owner: the callback, as its messages name it.
        keys: argument -> the batch key (or dotted path) it names, which the batch must have.
        token_maps: the same for per-token ``[B, L]`` tensors.
        include: glob patterns of sites to keep: one that matches no site that ran is an error.
        exclude: glob patterns of sites to leave out: one that matches no site that ran is a warning.
        save_dir: the output directory: an existing file there is an error.

    Raises:
        ValueError: at the first batch, one for all the wrong names found there.

    Example:
        >>> check = FirstBatchCheck("Tracker", token_maps={"token_ids_key": "ids"})
        >>> check.reset(["validate"])
        >>> try:
        ...     check.batch_start(nn.Identity(), {"idz": [[1, 2]]}, "validate")
        ... except ValueError as error:
        ...     print(str(error).split(": ", 1)[1].split(". ")[0])
        token_ids_key='ids' is not in the batch (close batch keys: 'idz', 'idz.0')
    """

    def __init__(
        self,
        owner: str,
        keys: Mapping[str, str] | None = None,
        token_maps: Mapping[str, str] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        save_dir: Path | None = None,
    ) -> None:
        self.owner = owner
        self.keys, self.token_maps = dict(keys or {}), dict(token_maps or {})
        self.include, self.exclude, self.save_dir = include, exclude, save_dir
        self._pending: set[str] = set()
        self._census: AttentionRecorder | None = None

    def reset(self, stages: Sequence[str]) -> None:
        """Check again at the first batch of each of ``stages`` (a new run)."""
        self._pending = set(stages)

    def batch_start(self, model: nn.Module, batch: Any, stage: str) -> None:
        """Before the first step of ``stage``: check the batch keys and ``save_dir``, start recording the sites."""
        if stage not in self._pending or self._census is not None:
            return
        problems = batch_key_problems(batch, self.keys, self.token_maps)
        if self.save_dir is not None and self.save_dir.exists() and not self.save_dir.is_dir():
            problems.append(f"save_dir={str(self.save_dir)!r} is a file, not a directory")
        if problems:
            raise ValueError(
                f"{self.owner}, at the first {stage} batch: {'; '.join(problems)}. Batch keys are keys of the batch or "
                "dotted paths into it ('meta.dist', '0.ids')."
            )
        self._census = AttentionRecorder(model, keep=False).__enter__()

    def batch_end(self, stage: str) -> None:
        """After the first step of ``stage``: check the site patterns against the attention sites that ran (none ran:
        nothing to check, the recorders warn)."""
        census, self._census = self._census, None
        if census is None:
            return
        self._pending.discard(stage)
        close_recorder(census, quiet=True)
        if not census.sites:
            return
        errors, unused = site_pattern_problems(self.include, self.exclude, list(census.sites))
        if unused:
            rank_zero_warn(f"{self.owner}: {'; '.join(unused)}; it leaves nothing out", category=UserWarning)
        if errors:
            raise ValueError(
                f"{self.owner}, at the first {stage} batch: {'; '.join(errors)}. Patterns are fnmatch globs over the "
                "qualified names of the modules that computed attention ('*' crosses dots)."
            )

    def abort(self) -> None:
        """The loop raised: stop recording."""
        census, self._census = self._census, None
        close_recorder(census, quiet=True)
