"""The AttentionLogger's arguments that name attention sites (``include``, ``exclude``, ``modality_pairs``,
``token_names`` keys), checked against the sites that ran at the first evaluation batch: one error naming every
wrong value with the close site names, so that a typo fails the sanity check instead of leaving a figure or a
statistic silently missing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_attn.callbacks.base import close_recorder, open_recorder
from lightning_attn.capture.recorder import AttentionRecorder, site_selected
from lightning_attn.capture.site_names import close_names, sites_matching
from lightning_attn.metrics.attention_epoch import TokenNames, label_pattern

__all__ = ["SiteCensus", "check_site_arguments"]


def check_site_arguments(
    owner: str,
    model: str,
    sites: Sequence[str],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    modality_pairs: Mapping[str, tuple[str, str]],
    token_names: TokenNames | None,
) -> None:
    """Check the site-naming arguments of ``owner`` (e.g. ``AttentionLogger('attn')``) against the ``sites`` that
    ran in a forward pass of ``model`` (its class name); nothing to check when no site ran (the recorder warns).

    An ``exclude`` pattern that matches no site is a warning (it changes nothing); every other mistake an error.

    Raises:
        ValueError: an ``include`` pattern that matches no site; a ``modality_pairs`` site or ``token_names`` key
            that matches no site kept by ``include``/``exclude``. One message for all, with the close site names.

    Example::

        check_site_arguments("AttentionLogger('attn')", "Net", ["encoder.0.attn"], ["encodr.*"], None, {}, None)
        # ValueError: AttentionLogger('attn'): include pattern 'encodr.*' matches no attention site
        # (close site names: 'encoder.0.attn'). ...
    """
    if not sites:
        return
    errors = [
        f"include pattern {pattern!r} matches no attention site ({close_names(pattern, sites)})"
        for pattern in include or ()
        if not sites_matching(pattern, sites)
    ]
    for pattern in exclude or ():
        if not sites_matching(pattern, sites):
            rank_zero_warn(
                f"{owner}: exclude pattern {pattern!r} matches no attention site of {model}, so it excludes nothing "
                f"({close_names(pattern, sites)})",
                category=UserWarning,
            )
    kept = [site for site in sites if site_selected(site, include, exclude)]
    named = [
        (f"modality_pairs[{pair!r}] {direction} site {pattern!r}", pattern)
        for pair, patterns in modality_pairs.items()
        for direction, pattern in zip(("A->B", "B->A"), patterns, strict=True)
    ]
    if isinstance(token_names, Mapping):
        named += [(f"token_names key {key!r}", label_pattern(str(key))[0]) for key in token_names]
    for what, pattern in named:
        if sites_matching(pattern, kept):
            continue
        if sites_matching(pattern, sites):
            errors.append(f"{what} names only sites that include/exclude leave out: {sites_matching(pattern, sites)}")
        else:
            errors.append(f"{what} matches no attention site ({close_names(pattern, kept or sites)})")
    if errors:
        raise ValueError(
            f"{owner}: "
            + "; ".join(errors)
            + f". The attention sites of {model} at the first batch: {', '.join(repr(s) for s in sites)} (names and "
            "fnmatch globs over them are accepted; '*' matches across dots)."
        )


class SiteCensus:
    """The names of every attention site that runs in one evaluation batch (the first one of a run, also in the sanity
    check): a recorder of all sites, nothing computed, opened at the batch start and closed at its end."""

    def __init__(self) -> None:
        self.due = True
        self._recorder: AttentionRecorder | None = None

    def start(self, module: nn.Module, exact_outputs: bool) -> None:
        """Open the recorder when the census is due (nothing otherwise)."""
        if self.due and self._recorder is None:
            self._recorder = open_recorder(module, lambda capture: None, exact_outputs=exact_outputs)

    def finish(self) -> list[str] | None:
        """The sites that ran since :meth:`start`, once per census (``None`` when there was none)."""
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return None
        self.due = False
        close_recorder(recorder, quiet=True)  # a model without attention: the analysing recorder says so
        return list(recorder.sites)

    def abort(self) -> None:
        """Let go of an open recorder (the batch raised)."""
        close_recorder(self._recorder, quiet=True)
        self._recorder = None
