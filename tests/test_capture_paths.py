"""The recorder on PyTorch's own attention, hand-written attention, torch.compile, invisible kernels and threads.

Same contract as ``test_capture_models.py`` (:mod:`capture_matrix`): maps against an independent reference (a float64
recomputation from the module's weights, or the uncompiled model), outputs bitwise unchanged, nothing left installed.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from capture_matrix import assert_restored, compare, print_table, record
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_at_import

from lightning_attn import AttentionRecorder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    print_table()


# -- nn.MultiheadAttention variants, against a float64 recomputation from the module's weights ----------------------
def reference_mha(mha: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """Per-head probabilities ``[B, H, L, S]`` of ``mha`` for batch-first ``query``/``key``, in float64."""
    e, h = mha.embed_dim, mha.num_heads
    w_q = mha.in_proj_weight[:e] if mha.in_proj_weight is not None else mha.q_proj_weight
    w_k = mha.in_proj_weight[e : 2 * e] if mha.in_proj_weight is not None else mha.k_proj_weight
    bias = mha.in_proj_bias
    q = (query.double() @ w_q.double().T + bias[:e].double()).unflatten(-1, (h, e // h)).transpose(1, 2)
    k = key.double() @ w_k.double().T + bias[e : 2 * e].double()
    if mha.bias_k is not None:  # add_bias_kv: one more key, the learned bias
        k = torch.cat([k, mha.bias_k.double().expand(k.shape[0], 1, e)], dim=1)
    k = k.unflatten(-1, (h, e // h)).transpose(1, 2)
    if mha.add_zero_attn:  # one more key of zeros
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])], dim=2)
    return ((q @ k.transpose(-1, -2)) / (e // h) ** 0.5).softmax(-1)


MHA_VARIANTS = {
    "kdim/vdim (cross)": (dict(kdim=12, vdim=10), dict(need_weights=False)),
    "add_bias_kv": (dict(add_bias_kv=True), dict(need_weights=False)),
    "add_zero_attn": (dict(add_zero_attn=True), dict(need_weights=False)),
    "batch_first False": (dict(batch_first=False), dict(need_weights=False)),
    "average_attn_weights True": (dict(), dict(need_weights=True, average_attn_weights=True)),
}


@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
def test_multihead_attention_variants(variant: str) -> None:
    torch.manual_seed(13)
    module_args, call_args = MHA_VARIANTS[variant]
    mha = nn.MultiheadAttention(16, 4, **{"batch_first": True, **module_args}).train()  # train: the slow path
    x = torch.randn(2, 5, 16)
    memory = (torch.randn(2, 7, 12), torch.randn(2, 7, 10)) if "kdim" in module_args else (x, x)
    q, k, v = (t if mha.batch_first else t.transpose(0, 1) for t in (x, *memory))
    if "kdim" not in module_args:
        k = v = q  # self-attention: the same tensor three times
    recorder, streamed, out = record(mha, lambda: mha(q, k, v, **call_args))
    info = recorder.sites["MultiheadAttention"]
    assert info.kind == ("cross" if "kdim" in module_args else "self")
    if call_args["need_weights"]:
        assert out[1].shape == (2, 5, 5)  # the caller still gets the head average it asked for
    with torch.no_grad():
        expected = reference_mha(mha, x, memory[0])
    compare("nn.MultiheadAttention", variant, [p for _, p in streamed], [expected])


# -- hand-written attention: a softmax over the keys inside a module's forward --------------------------------------
SOFTMAXES: dict[str, Callable[[Tensor], Tensor]] = {
    "Tensor.softmax": lambda s: s.softmax(dim=-1),
    "F.softmax": lambda s: F.softmax(s, dim=-1),
    "torch.softmax": lambda s: torch.softmax(s, -1),
    "nn.Softmax": nn.Softmax(dim=-1),
}


class Mixer(nn.Module):
    """Research-code attention in a module not named like one: ``softmax(q k^T / sqrt(d)) v``, heads or not."""

    def __init__(self, softmax: Callable[[Tensor], Tensor], heads: int = 4, returns_weights: bool = False) -> None:
        super().__init__()
        self.qkv, self.heads, self.returns_weights = nn.Linear(16, 48), heads, returns_weights
        self.softmax = softmax

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.heads > 1:
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, v

    def forward(self, x: Tensor) -> Any:
        scores, v = self.scores(x)
        weights = self.softmax(scores)
        out = weights @ v
        if self.heads > 1:
            out = out.transpose(1, 2).flatten(-2)
        return (out, weights) if self.returns_weights else out


class WeightsAttention(Mixer):
    """Hugging Face eager style: an attention module that returns ``(output, weights)``."""

    def __init__(self) -> None:
        super().__init__(lambda s: s.softmax(-1), returns_weights=True)


class SingleHeadAttention(Mixer):
    """One head: the softmax is over ``[batch, queries, keys]``."""

    def __init__(self) -> None:
        super().__init__(lambda s: s.softmax(-1), heads=1)


class Classifier(nn.Module):
    """A softmax that is not attention: class probabilities ``[batch, length, classes]`` outside attention modules."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x).softmax(-1)


def first_output(module: nn.Module) -> nn.Module:
    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: Tensor) -> Tensor:
            out = self.inner(x)
            return out[0] if isinstance(out, tuple) else out

    return First()


HAND_WRITTEN = {
    **{name: (lambda f=f: Mixer(f)) for name, f in SOFTMAXES.items()},
    "returns its weights too": WeightsAttention,
    "one head [B, Q, K]": SingleHeadAttention,
}


@pytest.mark.parametrize("case", list(HAND_WRITTEN))
def test_hand_written_attention(case: str) -> None:
    torch.manual_seed(14)
    attention = HAND_WRITTEN[case]()
    model = nn.Sequential(first_output(attention), Classifier())
    x = torch.randn(2, 6, 16)
    recorder, streamed, _ = record(model, lambda: model(x))
    assert list(recorder.sites) == ["0.inner"]  # one capture, and none for the classifier's softmax
    assert recorder.sites["0.inner"].source == ("weights" if attention.returns_weights else "softmax")
    with torch.no_grad():
        scores, _ = attention.scores(x)
        expected = scores.double().softmax(-1)
    compare("hand-written", case, [p for _, p in streamed], [expected if expected.dim() == 4 else expected[:, None]])


# -- torch.compile, autocast ---------------------------------------------------------------------------------------
class SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_torch_compile(fullgraph: bool, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(15)
    torch._dynamo.reset()  # no graph cached by another test: the first call below traces with the recorder active
    model = nn.Sequential(SdpaBlock(), first_output(Mixer(SOFTMAXES["F.softmax"]))).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        eager_maps = [p for _, p in record(model, lambda: model(x))[1]]
    compiled_forward = compiled.forward
    with caplog.at_level(logging.INFO, logger="lightning_attn"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `torch.compile")  # torch's note on global hooks
        with torch.no_grad(), AttentionRecorder(compiled) as first:  # the first call traces with the recorder active
            compiled(x)
        recorder, streamed, _ = record(compiled, lambda: compiled(x))
    assert list(first.maps) == list(recorder.sites) == ["0", "1.inner"]
    bypassed = [r for r in caplog.records if "fullgraph" in r.getMessage()]
    assert len(bypassed) == (2 if fullgraph else 0) and all(
        r.levelno == logging.INFO for r in bypassed
    )  # one per recorder
    assert compiled.forward == compiled_forward  # the compiled graph is back
    path = "fullgraph (eager module while recording)" if fullgraph else "default"
    compare("torch.compile", path, list(first.maps.values()), eager_maps, atol=0.0)
    compare("torch.compile", path, [p for _, p in streamed], eager_maps, atol=0.0)


# -- what the recorder cannot see, and threads ---------------------------------------------------------------------
class HiddenAttention(SdpaBlock):
    """Attention through a function bound at import time: the recorder cannot see it."""

    num_heads = 4

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(sdpa_bound_at_import(q, k, v).transpose(1, 2).flatten(-2))


def test_warning_names_attention_modules_that_ran_without_a_capture() -> None:
    model = nn.Sequential(SdpaBlock(), HiddenAttention())
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match=r"1 \(HiddenAttention\)") as caught, AttentionRecorder(model) as recorder:
        model(x)
        model(x)
    assert len([w for w in caught if "AttentionRecorder" in str(w.message)]) == 1
    assert list(recorder.maps) == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AttentionRecorder(model, include=["0"]):  # the hidden module is not asked for: nothing to say
            model(x)
    with (
        pytest.warns(UserWarning, match="filtered out every attention site") as caught,
        AttentionRecorder(model, include=["decoder.*"]),
    ):
        model(x)
    assert "custom" not in str(caught[0].message)
    assert_restored(model)


def test_threads_get_their_own_maps_only() -> None:
    torch.manual_seed(17)

    class Yielding(nn.Module):
        """Two attention calls with a thread switch between them."""

        def __init__(self, length: int) -> None:
            super().__init__()
            self.a, self.b, self.length = SdpaBlock(), SdpaBlock(), length

        def forward(self, x: Tensor) -> Tensor:
            x = self.a(x)
            threading.Event().wait(0.001)
            return self.b(x)

    models = [Yielding(4), Yielding(7)]
    inputs = [torch.randn(1, m.length, 16) for m in models]
    expected = []
    for model, x in zip(models, inputs, strict=True):
        with AttentionRecorder(model) as alone:
            model(x)
        expected.append(dict(alone.maps))
    barrier, failures = threading.Barrier(2), []

    def work(index: int) -> None:
        model, x = models[index], inputs[index]
        barrier.wait()
        for _ in range(20):
            with AttentionRecorder(model) as recorder:
                model(x)
            # allclose, not equal: with intra-op threads busy in both Python threads, a matmul may split its sums
            # differently; another model's maps (other weights, other lengths) are far from these
            if list(recorder.maps) != ["a", "b"] or any(
                not torch.allclose(recorder.maps[s], expected[index][s], atol=1e-6) for s in ("a", "b")
            ):
                failures.append((index, {s: tuple(p.shape) for s, p in recorder.maps.items()}))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
