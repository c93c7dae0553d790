"""The post-softmax quantizer chosen per attention (post_softmax='auto')."""

import pytest
import torch

from pfcr_mm.adapters import prepare, prepare_calibrated
from pfcr_mm.quant import choice
from pfcr_mm.quant.attention import POST_SOFTMAX_CANDIDATES, AttentionQuantizers
from pfcr_mm.quant.calibrate import (
    DownstreamOutputs,
    calibrate_activations,
    quant_summary,
    quantizer_states,
    set_quant_state,
)
from pfcr_mm.quant.quantizers import LogQuantizer
from pfcr_mm.settings import QuantConfig


def _attentions(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AttentionQuantizers)}


def _renormalized_product(probs, v):
    """The reference of ``post_softmax_renorm``: each row of ``probs`` divided by its sum."""
    return (probs / probs.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("bits, renorm", [(3, False), (8, False), (3, True)])
def test_each_attention_keeps_the_candidate_of_least_output_error(
    tiny_timm_vit, monkeypatch, recorded_scores, bits, renorm
):
    """Without the model's outputs the choice is the least ``probs @ v`` error (with the
    renormalization, of the renormalized product: the choice scores what runs)."""
    x = torch.randn(8, 3, 32, 32)
    model = tiny_timm_vit()
    scored = recorded_scores
    cfg = QuantConfig(w_bits=bits, a_bits=bits, post_softmax="auto", post_softmax_renorm=renorm)
    prepare_calibrated(model, cfg, lambda m: m(x))
    attentions = _attentions(model)
    assert len(attentions) == len(scored) == 4  # depth 4
    # what the scoring pass saw: each attention's FP probabilities and v on the same images
    seen = {}
    attend = AttentionQuantizers.attend
    monkeypatch.setattr(
        AttentionQuantizers,
        "attend",
        lambda self, p, v: (seen.__setitem__(id(self), (p, v)), attend(self, p, v))[1],
    )
    set_quant_state(model, weights=False, activations=False)
    with torch.no_grad():
        model(x)
    for m in attentions.values():
        scores = scored[id(m)]
        assert len(scores) == len(POST_SOFTMAX_CANDIDATES) and len(set(scores)) > 1
        best = min(range(len(scores)), key=scores.__getitem__)
        kind, k = POST_SOFTMAX_CANDIDATES[best]
        assert m.chosen() == ({"kind": "log", "k": k} if kind == "log" else {"kind": "uniform"})
        # the chosen quantizer's score is the squared error it causes in probs @ v
        probs, v = seen[id(m)]
        product = _renormalized_product if renorm else torch.matmul
        error = (product(m.probs.fake_quant(probs), v) - probs @ v).pow(2).sum().item()
        assert scores[best] == pytest.approx(error, rel=1e-4)
    names = {r["quantizer"] for r in quant_summary(model) if r["module"].endswith(".probs")}
    assert names == {m.probs.describe()["quantizer"] for m in attentions.values()}


def test_renormalization_divides_each_row_by_its_quantized_sum():
    """``post_softmax_renorm``: ``(P_q @ V_q) / rowsum(P_q)``; a row that quantizes to all 0
    stays 0 (no division by 0); off, the plain product."""
    torch.manual_seed(0)
    probs, v = (3 * torch.randn(2, 2, 6, 6)).softmax(-1), torch.randn(2, 2, 6, 4)
    attention = {}
    for renorm in (False, True):
        cfg = QuantConfig(w_bits=3, a_bits=3, post_softmax="log2", post_softmax_renorm=renorm)
        att = attention[renorm] = AttentionQuantizers(cfg)
        for q, x in ((att.probs, probs), (att.v, v)):
            q.observe(x)
            q.calibrate_from_stats(q.take_observed())
            q.set_state("quant")
    plain = attention[False]
    pq, vq = plain.probs(probs), plain.v(v)
    assert (pq.sum(-1) - 1).abs().max() > 0.1  # 3-bit log2 rounding moves the row sums off 1
    with torch.no_grad():
        ref, out = plain.attend(probs, v), attention[True].attend(probs, v)
    assert torch.equal(ref, pq @ vq)
    torch.testing.assert_close(out, _renormalized_product(pq, vq))
    # here the renormalized product is nearer the FP one
    fp = probs @ v
    assert (out - fp).pow(2).sum() < 0.8 * (ref - fp).pow(2).sum()
    # in floating point (the probabilities passed through) the product is exactly the FP one
    fp_att = AttentionQuantizers(attention[True].cfg)
    assert torch.equal(fp_att.attend(probs, v), fp)
    # a row whose probabilities all quantize to 0 has nothing to rescale
    zero = torch.zeros(1, 1, 1, 6)
    assert torch.equal(attention[True].attend(zero, v[:1, :1]), torch.zeros(1, 1, 1, 4))


def test_the_choice_is_saved_with_the_model(tiny_timm_vit):
    x = torch.randn(8, 3, 32, 32)
    cfg = QuantConfig(w_bits=4, a_bits=4, post_softmax="auto")
    model = tiny_timm_vit()
    prepare_calibrated(model, cfg, lambda m: m(x))
    # force a log candidate of a searched base in one attention, to see k travel
    first = next(iter(_attentions(model).values()))
    first.probs = LogQuantizer(4, k=2 * 2**0.5)
    first.probs.calibrated = True
    first.probs.delta.fill_(0.7)
    loaded = tiny_timm_vit()
    prepare(loaded, cfg)
    loaded.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(_attentions(model).items(), _attentions(loaded).items()):
        assert a.chosen() == b.chosen()
        assert b.probs.describe() == a.probs.describe()
    set_quant_state(model, weights=True, activations=True)
    set_quant_state(loaded, weights=True, activations=True)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_model_used_before_the_choice_is_refused(tiny_timm_vit):
    model = tiny_timm_vit()
    prepare(model, QuantConfig(post_softmax="auto"))
    first = next(iter(_attentions(model).values()))
    first.probs.calibrated = True
    with pytest.raises(RuntimeError, match="choice was not made"):
        first.probs.fake_quant(torch.rand(2, 2))


def _logit_error(model, att, index, x):
    """The squared logit error when only candidate ``index`` of ``att`` quantizes."""
    with torch.no_grad(), quantizer_states(model, weights=False, activations=False):
        ref = model(x)
        with att.trying(index):
            return float((model(x) - ref).pow(2).sum())


# (shortlist ratio, attentions decided by the outputs): 1 shortlists only the best candidate
# of each attention, the default ratio the best two (at most 2x the best error, here 1.7x-2x)
@pytest.mark.parametrize(
    "ratio, by_outputs", [(1.0, 0), (choice.SHORTLIST_RATIO, 4), (float("inf"), 4)]
)
def test_close_calls_are_decided_by_the_error_at_the_outputs(
    tiny_timm_vit, monkeypatch, ratio, by_outputs
):
    """Candidates within SHORTLIST_RATIO of the best probs @ v error are each tried alone, and the
    one of least logit error is kept; the summary records both errors and how it was chosen."""
    monkeypatch.setattr(choice, "SHORTLIST_RATIO", ratio)
    batches = [
        torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (0, 1)
    ]
    model = tiny_timm_vit()
    prepare(model, QuantConfig(w_bits=4, a_bits=4, post_softmax="auto"))
    pending = {}
    start = AttentionQuantizers.start_scoring
    monkeypatch.setattr(
        AttentionQuantizers,
        "start_scoring",
        lambda self: (pending.__setitem__(id(self), self.probs), start(self))[1],
    )
    lines = []

    def loop(m):
        for b in batches:
            m(b)

    outputs = DownstreamOutputs(batches, lambda m, b: m(b), lines.append)
    calibrate_activations(model, loop, outputs)
    rows = {r["module"]: r for r in quant_summary(model)}
    decided, tried = 0, 0
    for name, att in _attentions(model).items():
        record = rows[f"{name}.probs"]["choice"]
        pv, down = record["consumer_error"], record["downstream_error"]
        assert record["consumer"] == "probs @ v"
        short = [i for i, s in enumerate(pv) if s <= ratio * min(pv)]
        if len(short) == 1:
            assert record["chosen_by"] == "probs @ v" and down is None
        else:
            decided += 1
            tried += len(short)
            assert record["chosen_by"] == "downstream outputs"
            # every shortlisted candidate was tried and scored by its own logit error, no other
            assert [i for i, d in enumerate(down) if d == d] == short
            chosen = att.probs
            att.probs = pending[id(att)]  # the candidates again, to measure them independently
            for i in short:
                expected = sum(_logit_error(model, att, i, b) for b in batches)
                assert down[i] == pytest.approx(expected, rel=1e-5)
            best = min(short, key=down.__getitem__)
            assert chosen is pending[id(att)].candidates[best]
            att.probs = chosen
    assert decided == by_outputs
    # the outputs are computed only when there is a candidate to try
    progress = [f"quantizer choice: batch 2/2, {tried} candidates tried"] if decided else []
    assert lines[-1:] == progress


def test_outputs_that_are_not_tensors_are_refused(tiny_timm_vit):
    x = torch.randn(4, 3, 32, 32)
    model = tiny_timm_vit()
    prepare(model, QuantConfig(w_bits=4, a_bits=4, post_softmax="auto"))
    outputs = DownstreamOutputs([x], lambda m, b: [{"scores": m(b)}])
    with pytest.raises(TypeError, match="pass quantize\\(downstream=f\\)"):
        # every candidate tried, so the outputs are compared whatever the scores
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(choice, "SHORTLIST_RATIO", float("inf"))
            calibrate_activations(model, lambda m: m(x), outputs)
