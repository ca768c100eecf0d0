"""What :class:`~lightning_attn.ModuleProbe`'s hooks feed during a recorded evaluation batch: probed module outputs
and attention captures go into that batch's states, the probe batch's outputs into the probe samples.

Nothing here synchronizes with the host: it runs inside the forward pass of every recorded batch.
"""

from __future__ import annotations

from torch import Tensor

from lightning_attn.capture.probes import ProbeSpec
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.metrics.attention import key_mask_for
from lightning_attn.metrics.probes import ProbeSamples, ProbeStatistics, activation_view

__all__ = ["ProbeStream"]


class ProbeStream:
    """Routes the outputs of the current batch (between :meth:`start_batch` and :meth:`end_batch`; outside, outputs
    are dropped) into its :class:`~lightning_attn.metrics.probes.ProbeStatistics`.

    Args:
        chunk_size: query rows of an attention map reduced at a time for histograms (``None``: whole maps).
        max_positions: positions kept per probe sample.
    """

    def __init__(self, chunk_size: int | None, max_positions: int) -> None:
        self.chunk_size = chunk_size
        self.max_positions = max_positions
        #: The epoch's probe samples (``None`` until the probe batch; reset by the caller at each epoch start).
        self.samples: ProbeSamples | None = None
        #: The attention sites whose captures were histogrammed (over epochs, for the "matched nothing" warning).
        self.attention_sites: set[str] = set()
        self._statistics: ProbeStatistics | None = None
        self._position_mask: Tensor | None = None
        self._taking_samples = False

    def start_batch(self, statistics: ProbeStatistics, position_mask: Tensor | None, num_samples: int = 0) -> None:
        """Feed ``statistics`` until :meth:`end_batch`; ``position_mask``: the batch's ``[B, L]`` valid positions;
        ``num_samples`` > 0 on the probe batch: its first samples' outputs become the epoch's probe samples (once)."""
        self._statistics = statistics
        self._position_mask = position_mask
        if num_samples and self.samples is None:
            self.samples = ProbeSamples(num_samples, self.max_positions)
            self._taking_samples = True

    def end_batch(self) -> None:
        self._statistics = None
        self._position_mask = None
        self._taking_samples = False

    def finish_samples(self) -> dict[str, Tensor]:
        """The epoch's probe samples as host tensors (a host sync: epoch end only), and forget them."""
        samples, self.samples = self.samples, None
        return samples.finish() if samples is not None else {}

    def on_output(self, spec: ProbeSpec, site: str, output: Tensor) -> None:
        """A probed module's output (:class:`~lightning_attn.capture.probes.ModuleHooks`' consumer)."""
        statistics = self._statistics
        if statistics is None:
            return
        samples = self.samples if self._taking_samples else None
        if spec.kind == "activation":
            view = activation_view(output)
            # outputs without a position axis have nothing to mask
            mask = self._position_mask if self._position_mask is not None and view.shape[1] > 1 else None
            statistics.update_activation(site, view, position_mask=mask)
            if samples is not None:
                samples.add(site, view, position_dim=1)
        else:
            probs = statistics.update_weights(site, output, histogram=True)
            if samples is not None and probs.shape[-2] == 1:
                samples.add(site, probs[:, :, 0, :], position_dim=2)

    def on_capture(self, capture: AttentionCapture) -> None:
        """An attention site's capture (an :class:`~lightning_attn.AttentionRecorder`'s consumer): its histogram."""
        statistics = self._statistics
        if statistics is None:
            return
        site = capture.info.name
        self.attention_sites.add(site)
        for _, chunk in capture.chunks(self.chunk_size):
            statistics.update_histogram(site, chunk, key_mask_for(capture, chunk))
