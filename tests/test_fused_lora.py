"""The fused LoRA path computes what PEFT computes: outputs and every gradient, with and without dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_ft.model.fused_lora import fuse_lora_layers


def _pair(dropout: float, dtype=torch.float32, rslora=False):
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16, bias=False)).to(dtype)
        cfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"], use_rslora=rslora)
        model = get_peft_model(net, cfg)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give the low-rank path something to carry
                nn.init.normal_(param, std=0.5)
        return model

    return build(), build()


# fp32 round-off: each reduction of n terms can be off by about n * eps * (its largest partial sum), and summation
# order differs between the two paths (and between CPUs' vector widths). The deepest chain here, input gradient
# through both linears and their rank-4 terms, reduces over at most 24 + 32 + 16 + 2*4 = 80 terms.
FP32_EPS = torch.finfo(torch.float32).eps
CHAIN_TERMS = 80


def assert_equal_to_fp32_rounding(actual, expected, msg=None):
    tolerance = 4 * CHAIN_TERMS * FP32_EPS * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance, msg=msg)


def _run(model, x):
    out = model(x)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad.detach().clone()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "delta"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_layers_match_peft_outputs_and_gradients(monkeypatch, dropout, rslora, kind, device):
    """Same masks in both paths (recorded from the fused one, replayed into PEFT's nn.Dropout); on CUDA this also
    checks that backward redraws the forward's masks from the saved CUDA generator state."""
    plain, fused = (m.to(device) for m in _pair(dropout, rslora=rslora))
    assert fuse_lora_layers(fused) == 2
    if kind == "delta":  # the 4-bit path (base layer's own kernel, then the fused LoRA term), on a plain base
        for layer in (fused.base_model.model[0], fused.base_model.model[2]):
            layer._loraft_fused_kind = "delta"
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(device)

    drawn = []  # every dropout mask the fused path draws: forward's, then backward's redraws

    def recording_dropout(t, p, train):
        dropped, mask = real_dropout(t, p, train)
        drawn.append(mask)
        return dropped, mask

    real_dropout = torch.native_dropout
    monkeypatch.setattr(torch, "native_dropout", recording_dropout)
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused, grads_fused, gx_fused = _run(fused, x_fused)
    monkeypatch.setattr(torch, "native_dropout", real_dropout)

    # PEFT's layers (nn.Dropout -> F.dropout) replay the fused path's forward masks in the same order.
    replay = iter(drawn[:2])
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda t, p=0.5, training=True, inplace=False: t * next(replay).view(t.shape) / (1 - p) if training and p else t)
    out_plain, grads_plain, gx_plain = _run(plain, x_plain)

    if dropout:
        assert len(drawn) == 4  # two forward draws, two backward redraws (layer 2 first)
        assert torch.equal(drawn[3], drawn[0]) and torch.equal(drawn[2], drawn[1])
        assert 0 < sum(int((~m).sum()) for m in drawn[:2])
    else:
        assert drawn == []
    assert_equal_to_fp32_rounding(out_fused, out_plain)
    assert_equal_to_fp32_rounding(gx_fused, gx_plain)
    assert grads_fused.keys() == grads_plain.keys() and len(grads_plain) == 4
    for name in grads_plain:
        assert_equal_to_fp32_rounding(grads_fused[name], grads_plain[name], msg=name)
        assert grads_plain[name].abs().sum() > 0


def test_fused_dropout_drops_what_it_should():
    """With real dropout: the fused layer in train mode is random with the right mean; in eval mode it is PEFT's."""
    plain, fused = _pair(0.5)
    fuse_lora_layers(fused)
    x = torch.randn(1000, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused.eval(), plain.eval()
        assert_equal_to_fp32_rounding(fused(x), plain(x))
        fused.train()
        layer = fused.base_model.model[0]
        runs = torch.stack([layer(x) for _ in range(512)]).mean(0)
        expected = plain.base_model.model[0](x)
        single = layer(x)
    assert not torch.allclose(single, expected, atol=1e-3)  # one draw really drops
    assert (runs - expected).abs().mean() < 0.06 * expected.abs().mean()  # unbiased: x / (1 - p) where kept


def test_bf16_autocast_matches_peft_within_bf16_rounding():
    """Under bf16 autocast both paths round differently, so each is compared with the exact fp32 answer."""
    exact, _ = _pair(0.0)
    plain, fused = _pair(0.0, dtype=torch.bfloat16)
    for model in (plain, fused):
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # PEFT's autocast_adapter_dtype: fp32 LoRA masters on a bf16 base
    fuse_lora_layers(fused)
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(3))
    reference = exact(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [m(x.bfloat16()) for m in (plain, fused)]
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    plain_error, fused_error = ((o.float() - reference).abs().max().item() for o in outs)
    assert fused_error <= 1.5 * plain_error + 1e-3
    reference.pow(2).mean().backward()
    for out in outs:
        out.float().pow(2).mean().backward()
    exact_grads = dict(exact.named_parameters())
    for (name, p_plain), (_, p_fused) in zip(plain.named_parameters(), fused.named_parameters()):
        if p_plain.requires_grad:
            assert p_fused.grad.dtype == torch.float32
            truth = exact_grads[name].grad
            scale = truth.abs().max().item()
            assert (p_fused.grad - truth).abs().max().item() <= 1.5 * (p_plain.grad - truth).abs().max().item() + 0.02 * scale, name


def test_what_the_fused_path_cannot_do_runs_through_peft():
    plain, fused = _pair(0.0)
    fuse_lora_layers(fused)
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(x), plain(x))
    fused.base_model.model[0].merge()  # merged weights: PEFT's path
    with torch.no_grad():
        assert_equal_to_fp32_rounding(fused(x), plain(x))


def test_a_fused_model_saves_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    plain, fused = _pair(0.0)
    assert fuse_lora_layers(fused) == 2
    assert fuse_lora_layers(fused) == 0  # idempotent
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
