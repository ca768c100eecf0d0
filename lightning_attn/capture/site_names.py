"""Name lookups for arguments that name attention sites: which sites a glob selects, and what to suggest when it
selects none (``difflib`` close matches)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from lightning_attn.capture.recorder import site_selected

__all__ = ["close_names", "sites_matching"]


def sites_matching(pattern: str, sites: Sequence[str]) -> list[str]:
    """The ``sites`` that ``pattern`` names: equal to it, or matched as a glob (``*`` crosses dots; a repeated call
    ``<site>#k`` with its ``<site>``).

    >>> sites_matching("encoder.*", ["encoder.0.attn", "encoder.0.attn#1", "decoder.0.attn"])
    ['encoder.0.attn', 'encoder.0.attn#1']
    """
    return [site for site in sites if site == pattern or site_selected(site, [pattern], None)]


def close_names(value: str, names: Sequence[str], noun: str = "site") -> str:
    """A hint for a ``value`` that names nothing: the ``names`` close to it, else the first few of them.

    >>> close_names("encoder.layer.*", ["encoder.layers.0.attn", "head"])
    "close site names: 'encoder.layers.0.attn'"
    """
    close = difflib.get_close_matches(value, names, n=6, cutoff=0.5)
    if close:
        return f"close {noun} names: " + ", ".join(repr(name) for name in close)
    shown = ", ".join(repr(name) for name in names[:8])
    return f"no {noun} name is close; the {len(names)} {noun}s include {shown}"
