"""The AttentionLogger's figures of one epoch: data in (its results, the probe maps), Figures out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from lightning_attn.functional.attention import modality_agreement
from lightning_attn.metrics.attention_epoch import TokenNames, position_labels
from lightning_attn.metrics.attention_results import AttentionResults
from lightning_attn.plots import attention as plots

__all__ = ["attention_epoch_figures"]


def attention_epoch_figures(
    results: AttentionResults,
    probe: Mapping[str, Any] | None,
    *,
    sites: Sequence[str],
    probe_samples: int,
    pair_sites: Mapping[str, tuple[str, str]],
    token_names: TokenNames | None = None,
) -> dict[str, Figure]:
    """Figures keyed ``<stage key>/<figure>``: ``head_statistics``, ``layer_evolution``, and for the chosen ``sites``
    ``head_contributions`` and ``top_attended``. With the ``probe`` maps (:meth:`ProbeMaps.finish`) also
    ``maps/<site>`` (titled for ``probe_samples`` samples) and ``heads/<site>`` of the chosen sites, ``rollout``, and
    ``pairs/<pair>`` of every modality pair whose two sites (``pair_sites``) have probe maps. Positions are named by
    ``token_names`` (:func:`~lightning_attn.metrics.attention_epoch.position_labels`)."""
    figures = _summary_figures(results, sites)
    if probe is not None:
        figures.update(_probe_figures(results, probe, sites, probe_samples, pair_sites, token_names))
    return figures


def _summary_figures(results: AttentionResults, chosen: Sequence[str]) -> dict[str, Figure]:
    key, epoch = results.stage, f"epoch {results.epoch}"
    figures = {
        f"{key}/head_statistics": plots.plot_head_statistics(
            results.mean, results.sites, title=f"Per-head attention statistics ({key}, {epoch})"
        )
    }
    evolution = [n for n in ("entropy", "sparsity", "max_weight") if n in results.mean]
    if evolution:
        figures[f"{key}/layer_evolution"] = plots.plot_layer_evolution(
            results.sites,
            {n: results.site_mean(n) for n in evolution},
            {n: results.head_spread(n) for n in evolution},
            title=f"Layer evolution ({key}, {epoch}; band: std across heads)",
        )
    if "max_weight" in results.mean:
        rows = [results.sites.index(s) for s in chosen]
        figures[f"{key}/head_contributions"] = plots.plot_head_contributions(
            chosen,
            results.mean["max_weight"][rows],
            results.std["max_weight"][rows],
            statistic="max_weight",
            title=f"Head contributions: mean max weight per head ({key}, {epoch}; error bars: std over rows)",
        )
    attended = {s: results.top_attended[s] for s in chosen if results.top_attended.get(s)}
    if attended:
        figures[f"{key}/top_attended"] = plots.plot_top_positions(
            attended, title=f"Top attended positions ({key}, {epoch})"
        )
    return figures


def _probe_figures(
    results: AttentionResults,
    probe: Mapping[str, Any],
    chosen: Sequence[str],
    probe_samples: int,
    pair_sites: Mapping[str, tuple[str, str]],
    token_names: TokenNames | None,
) -> dict[str, Figure]:
    key, epoch = results.stage, f"epoch {results.epoch}"
    figures: dict[str, Figure] = {}
    titles = [f"probe {i}" for i in range(probe_samples)]
    for site in chosen:
        if site not in probe["mean"]:
            continue
        shape, pooled_shape = probe["shapes"][site], probe["mean"][site].shape[1:]
        pooled = pooled_shape != shape
        query_labels = None if pooled else position_labels(token_names, site, "queries", shape[0])
        key_labels = None if pooled else position_labels(token_names, site, "keys", shape[1])
        note = f" (pooled {shape[0]}x{shape[1]} -> {pooled_shape[0]}x{pooled_shape[1]})" if pooled else ""
        figures[f"{key}/maps/{site}"] = plots.plot_attention_maps(
            probe["mean"][site],
            titles=titles,
            query_labels=query_labels,
            key_labels=key_labels,
            title=f"{site}: head mean{note}, {epoch}",
        )
        figures[f"{key}/heads/{site}"] = plots.plot_attention_heads(
            probe["heads"][site],
            query_labels=query_labels,
            key_labels=key_labels,
            title=f"{site}: per head, probe 0{note}, {epoch}",
        )
    if probe["rollout"] is not None:
        first = probe["rollout_sites"][0]
        figures[f"{key}/rollout"] = plots.plot_rollout(
            probe["rollout"],
            labels=position_labels(token_names, first, "keys", probe["rollout"].shape[-1]),
            titles=titles,
            title=f"Attention rollout over {len(probe['rollout_sites'])} self-attention sites ({epoch})",
        )
    for pair, (a, b) in pair_sites.items():
        if a not in probe["mean"] or b not in probe["mean"]:
            continue
        a_to_b, b_to_a = probe["mean"][a][0], probe["mean"][b][0]
        if a_to_b.shape != b_to_a.T.shape:
            continue
        sides = tuple(part.strip() for part in pair.split("<->")) if "<->" in pair else ("A", "B")
        figures[f"{key}/pairs/{pair}"] = plots.plot_modality_pair(
            a_to_b,
            b_to_a,
            names=(sides[0], sides[1]),
            agreement=results.agreement.get(pair),
            sample_agreement=float(modality_agreement(a_to_b, b_to_a)),
            a_labels=position_labels(token_names, a, "queries", a_to_b.shape[0]),
            b_labels=position_labels(token_names, a, "keys", a_to_b.shape[1]),
            title=f"{pair}, probe 0, {epoch}",
        )
    return figures
