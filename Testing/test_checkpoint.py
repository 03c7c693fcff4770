"""Released-weights compatibility (side by side with a released-layout model) and our own format."""
from __future__ import annotations

import argparse

import pytest
import torch
from timm.models.vision_transformer import Block

from EchoFMEngine.bench.reference import NaiveBlock, ReferenceEchoFM
from EchoFMEngine.models import (CheckpointError, EchoFM, build_echofm, load_official_checkpoint,
                                 load_pretrained, save_pretrained)
from EchoFMEngine.models.checkpoint import convert_official_state_dict, read_pretrained_header
from EchoFMEngine.models.echofm import LayerNorm

# The side-by-side configuration: 64x64, 16 frames, tubelet 4, patch 16, width 192, depth 4.
REF = dict(img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
           decoder_depth=2, decoder_num_heads=4, num_frames=16, t_patch_size=4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return ReferenceEchoFM(**REF).eval()


@pytest.fixture(scope="module")
def clip():
    return torch.rand(2, 3, 16, 64, 64, generator=torch.Generator().manual_seed(0))


def _save(tmp_path, obj, name="released.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_reference_layout_matches_the_spec_table(reference):
    sd = reference.state_dict()
    assert "blocks.0.attn.q.weight" in sd and "decoder_block.attn.v.bias" in sd
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 4, 16, 16)
    assert sd["pos_embed_spatial"].shape == (1, 16, 192) and sd["pos_embed_temporal"].shape == (1, 4, 192)
    assert sd["decoder_pred.weight"].shape == (768, 128)
    assert {"prj_norm.weight", "decoder_prj_cls_token", "mask_token", "decoder_pos_embed_class"} <= set(sd)


def test_qkv_fusion_matches_an_unfused_block():
    torch.manual_seed(1)
    naive = NaiveBlock(64, 4).eval()
    fused = Block(64, 4, qkv_bias=True, norm_layer=LayerNorm).eval()
    sd, _ = convert_official_state_dict({f"b.{k}": v for k, v in naive.state_dict().items()})
    fused.load_state_dict({k[2:]: v for k, v in sd.items()})
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), naive(x), rtol=0, atol=1e-5)


def test_released_checkpoint_matches_reference_side_by_side(tmp_path, reference, clip):
    path = _save(tmp_path, {"model": reference.state_dict(), "model_args": reference.model_args()})
    model = load_official_checkpoint(path).eval()
    assert model.load_report["missing"] == [] and model.load_report["unexpected"] == []
    with torch.no_grad():
        ref_tokens = reference.forward_encoder(clip, 0.0)[0]
        torch.testing.assert_close(model.encode(clip, 0.0), ref_tokens, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.frame_embeddings(clip), reference.forward_projector(ref_tokens),
                                   rtol=0, atol=1e-4)


def test_pretraining_loss_matches_reference_for_the_same_mask(tmp_path, reference, clip):
    # One clip: our contrastive loss averages per sample first (so DDP shards average exactly),
    # the reference averages over the batch's anchors; for one clip both are the same number.
    clip = clip[:1]
    path = _save(tmp_path, {"model": reference.state_dict(), "model_args": reference.model_args()})
    loaded = load_official_checkpoint(path)
    model = EchoFM(loaded.cfg.with_overrides(contrastive="pixel", kl_weight=0.0))
    model.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        torch.manual_seed(7)
        ref_loss = reference(clip, 0.75)[0]
        torch.manual_seed(7)
        ours, _ = model.eval()(clip, 0.75)
    torch.testing.assert_close(ours, ref_loss, rtol=0, atol=1e-4)


def test_bare_state_dict_without_prj_norm_reuses_norm(tmp_path, clip):
    torch.manual_seed(2)
    ref = ReferenceEchoFM(**REF, with_prj_norm=False).eval()
    path = _save(tmp_path, {f"module.{k}": v for k, v in ref.state_dict().items()})
    model = load_official_checkpoint(path).eval()
    assert any("prj_norm" in n for n in model.load_report["notes"])
    assert model.cfg.num_heads == 3  # no model_args: width 192 -> 192 // 64 heads
    with torch.no_grad():
        tokens = ref.forward_encoder(clip, 0.0)[0]
        torch.testing.assert_close(model.frame_embeddings(clip), ref.forward_projector(tokens), rtol=0, atol=1e-4)


def test_training_checkpoint_with_namespace_args(tmp_path, reference):
    args = argparse.Namespace(num_frames=16, t_patch_size=4, pred_t_dim=4, num_heads=3, norm_pix_loss=True,
                              sep_pos_embed=True, cls_embed=True)
    path = _save(tmp_path, {"model": reference.state_dict(), "optimizer": {}, "epoch": 3, "args": args})
    model = load_official_checkpoint(path)
    assert model.cfg.norm_pix_loss and model.cfg.num_heads == 3 and model.cfg.num_frames == 16


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_file_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_official_checkpoint(path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, reference):
    sd = dict(reference.state_dict())
    sd["decoder_embed.weight"] = torch.zeros(128, 100)
    path = _save(tmp_path, {"model": sd, "model_args": reference.model_args()})
    with pytest.raises(CheckpointError, match=r"decoder_embed.weight has shape \(128, 100\).*\(128, 192\)"):
        load_official_checkpoint(path)


def test_missing_and_unexpected_keys_are_reported(tmp_path, reference):
    sd = dict(reference.state_dict())
    del sd["decoder_norm.weight"]
    sd["extra_head.weight"] = torch.zeros(2)
    path = _save(tmp_path, {"model": sd, "model_args": reference.model_args()})
    report = load_official_checkpoint(path).load_report
    assert report["missing"] == ["decoder_norm.weight"] and report["unexpected"] == ["extra_head.weight"]
    with pytest.raises(CheckpointError, match="missing keys"):
        load_official_checkpoint(path, strict=True)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_official_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        load_official_checkpoint(tmp_path / "absent.pth")


def test_own_format_round_trips_exactly(tmp_path):
    torch.manual_seed(3)
    model = build_echofm("tiny", norm_pix_loss=True, contrastive="pixel")
    save_pretrained(model, tmp_path / "run", metadata={"task": "pretrain", "note": "unit test"})
    cfg, meta = read_pretrained_header(tmp_path / "run")
    assert cfg == model.cfg and meta == {"task": "pretrain", "note": "unit test"}
    back = load_pretrained(tmp_path / "run" / "model.safetensors")
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_own_format_refuses_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an EchoFM safetensors"):
        load_pretrained(tmp_path / "other.safetensors")


def _videomae_state_dict(model, tubelet_file=2):
    """Our encoder written in VideoMAE's layout (encoder. prefix, q_bias/v_bias, shorter tubelet)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith(("decoder", "projector", "mask_token")) or "pos_embed" in k or k == "cls_token":
            continue
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            sd[f"encoder.{k[:-len('qkv.bias')]}q_bias"] = q
            sd[f"encoder.{k[:-len('qkv.bias')]}v_bias"] = vb
        elif k == "patch_embed.proj.weight":
            sd["encoder." + k] = v[:, :, :tubelet_file]
        else:
            sd["encoder." + k] = v
    sd["decoder.blocks.0.norm1.weight"] = torch.zeros(3)
    sd["encoder_to_decoder.weight"] = torch.zeros(3, 3)
    return sd


def test_videomae_style_checkpoint_initialises_the_encoder(tmp_path):
    from EchoFMEngine.models.checkpoint import init_from_checkpoint
    torch.manual_seed(4)
    source = build_echofm("tiny")
    with torch.no_grad():  # VideoMAE has no k bias; make ours zero so the round trip is exact
        for blk in source.blocks:
            blk.attn.qkv.bias[source.cfg.embed_dim:2 * source.cfg.embed_dim] = 0
    path = _save(tmp_path, {"model": _videomae_state_dict(source)}, "videomae.pth")
    target = build_echofm("tiny")
    report = init_from_checkpoint(target, path)
    assert any("inflated" in n for n in report["notes"])
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(target.blocks[1].attn.qkv.bias, source.blocks[1].attn.qkv.bias)
    w = source.patch_embed.proj.weight[:, :, :2]
    torch.testing.assert_close(target.patch_embed.proj.weight, w.repeat_interleave(2, dim=2) / 2)
    assert "decoder_embed.weight" in report["missing"]
