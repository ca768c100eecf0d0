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


def close_names(value: str | Sequence[str], names: Sequence[str], what: str = "site names") -> str:
    """The hint for a ``value`` (or several alternatives) that names nothing among ``names``: the names close to it
    (``difflib.get_close_matches``, closest first), else the first few of them; ``what`` is their plural noun. The one
    hint of every argument checked against names (sites, batch keys, module names, output keys).

    >>> close_names("encoder.layer.*", ["encoder.layers.0.attn", "head"])
    "close site names: 'encoder.layers.0.attn'"
    >>> close_names("tokens", ["0", "1"], "batch keys")
    "no close batch keys; the batch keys are '0', '1'"
    """
    wanted = [value] if isinstance(value, str) else list(value)
    close = dict.fromkeys(match for item in wanted for match in difflib.get_close_matches(item, names, n=6, cutoff=0.5))
    if close:
        return f"close {what}: " + ", ".join(repr(name) for name in close)
    if not names:
        return f"there are no {what}"
    listed = ", ".join(repr(name) for name in names[:8]) + (", ..." if len(names) > 8 else "")
    return f"no close {what}; the {what} are {listed}"
