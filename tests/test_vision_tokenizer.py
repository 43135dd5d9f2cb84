"""IBQ image tokenizer (model/vision_tokenizer.py): shapes, quantizer rule, index propagation,
checkpoint layouts against an independent functional forward, and the pixel helpers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from model.vision_tokenizer import (IBQ, IBQConfig, IndexPropagationQuantizer, ibq_preset, load_ibq,
                                    resize_to_area, save_ibq, to_pil, to_tensor)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return IBQ(ibq_preset("debug")).eval()


def images(batch=2, height=64, width=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


# ------------------------------------------------------------------ independent reference forward
# Written from the taming-transformers description, reading only the state dict, so a wrong module
# order, padding, attention scale or level numbering in the module shows up as a mismatch.

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", F.silu(_gn(sd, p + ".norm1", x)), padding=1)
    h = _conv(sd, p + ".conv2", F.silu(_gn(sd, p + ".norm2", h)), padding=1)
    skip = _conv(sd, p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in sd else x
    return skip + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, p + ".norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) / math.sqrt(c), dim=2)  # (b, L, L)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _level(sd, p, x):
    j = 0
    while f"{p}.block.{j}.conv1.weight" in sd:
        x = _res(sd, f"{p}.block.{j}", x)
        if f"{p}.attn.{j}.q.weight" in sd:
            x = _attn(sd, f"{p}.attn.{j}", x)
        j += 1
    return x


def _mid(sd, p, x):
    return _res(sd, p + ".block_2", _attn(sd, p + ".attn_1", _res(sd, p + ".block_1", x)))


def reference_encode(sd, num_levels, x):
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    for i in range(num_levels):
        h = _level(sd, f"encoder.down.{i}", h)
        if i < num_levels - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", _mid(sd, "encoder.mid", h))), padding=1)
    z = _conv(sd, "quant_conv", h)  # (B, D, h, w)
    dots = torch.einsum("bdhw,nd->bnhw", z, sd["quantize.embedding.weight"])
    return dots.argmax(dim=1)


def reference_decode(sd, num_levels, codes):
    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z), padding=1)
    h = _mid(sd, "decoder.mid", h)
    for i in reversed(range(num_levels)):
        h = _level(sd, f"decoder.up.{i}", h)
        if i > 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"),
                      padding=1)
    h = _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)), padding=1)
    return h.clamp(-1, 1)


# --------------------------------------------------------------------------------------- tests

def test_encode_decode_shapes_and_range(model):
    x = images(2, 64, 64)
    codes = model.encode(x)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 256
    assert model.encode(images(1, 32, 48)).shape == (1, 2, 3)  # height first
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(50)  # raw output far outside [-1, 1]
        raw = model.decoder(model.post_quant_conv(model.quantize.lookup(codes)))
        out = model.decode(codes)
    assert raw.abs().max() > 1.5
    assert out.shape == (2, 3, 64, 64)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, raw.clamp(-1, 1))


def test_matches_independent_reference_forward(model):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = images(2, 64, 48, seed=3)
    codes = model.encode(x)
    assert torch.equal(codes, reference_encode(sd, 5, x))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(codes), reference_decode(sd, 5, codes), atol=1e-5, rtol=1e-4)


def test_key_layout_follows_taming():
    torch.manual_seed(0)
    keys = set(IBQ(ibq_preset("debug")).state_dict())  # channels 32,32,64,64,64; attention at 4 px
    for key in ("encoder.down.0.downsample.conv.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "encoder.down.4.attn.0.proj_out.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.0.block.1.conv2.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.up.4.attn.1.v.weight",
                "quant_conv.weight", "post_quant_conv.bias", "quantize.embedding.weight"):
        assert key in keys, key
    for key in ("encoder.down.4.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.2.block.0.nin_shortcut.weight",
                "encoder.down.3.attn.0.q.weight", "decoder.up.0.block.2.conv1.weight"):
        assert key not in keys, key


def test_quantizer_picks_max_dot_product_not_nearest():
    q = IndexPropagationQuantizer(3, 2)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)  # (B, D, h, w)
    nearest = torch.cdist(z.view(1, 2), q.embedding.weight).argmin()
    assert nearest == 0  # the construction really separates the two rules
    assert q.codes(z).item() == 1  # dots: 0.9, 9.0, 0.1
    z_q, codes, _ = q(z)
    assert codes.item() == 1 and torch.equal(z_q.view(2), torch.tensor([10.0, 0.0]))


def test_index_propagation_reaches_unselected_codes(model):
    model.train()
    x = images(2, 64, 64)
    recon, codes, qloss = model(x)
    (recon.pow(2).mean() + qloss).backward()
    grad = model.quantize.embedding.weight.grad
    selected = torch.zeros(256, dtype=torch.bool)
    selected[codes.flatten()] = True
    assert (~selected).sum() > 200
    assert (grad[~selected].abs().sum(dim=1) > 0).all()
    # the forward value is the hard lookup: loss = (0.25 + 1) * mse(e[codes], z)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
        z_q = model.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
    torch.testing.assert_close(qloss.detach(), 1.25 * F.mse_loss(z_q, z))
    model.eval()
    assert torch.equal(codes, model.encode(x))


@pytest.mark.parametrize("layout", ["official", "worldsim"])
def test_checkpoint_round_trip(model, tmp_path, layout):
    save_ibq(model, tmp_path, layout=layout)
    if layout == "official":  # a training checkpoint also carries the GAN loss weights
        ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True)
        ckpt["state_dict"]["loss.discriminator.x"] = torch.zeros(7)
        torch.save(ckpt, tmp_path / "model.ckpt")
        assert (tmp_path / "config.yaml").exists() and not (tmp_path / "config.json").exists()
    loaded = load_ibq(tmp_path)
    assert loaded.config == model.config and not loaded.training
    x = images(2, 64, 64, seed=5)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    with torch.no_grad():
        assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_official_config_nested_and_bare_state_dict(model, tmp_path):
    save_ibq(model, tmp_path, layout="official")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    nested = {"model": {"target": "ibq.IBQ", "params": raw}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(nested))
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "model.ckpt")  # the released file is a bare state dict
    x = images(1, 64, 64, seed=7)
    assert torch.equal(load_ibq(tmp_path).encode(x), model.encode(x))


@pytest.mark.parametrize("field", ["ch_mult", "z_channels", "n_embed"])
def test_official_config_missing_field(model, tmp_path, field):
    save_ibq(model, tmp_path, layout="official")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw.pop(field, None)
    raw["ddconfig"].pop(field, None)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=field):
        load_ibq(tmp_path)


def test_worldsim_config_missing_field(model, tmp_path):
    import json

    save_ibq(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["num_res_blocks"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_res_blocks"):
        load_ibq(tmp_path)


def test_norm_groups(tmp_path):
    """A narrow tokenizer may use fewer GroupNorm groups (32 groups on 32 channels is an instance norm,
    which strips every channel's mean: colours); the field round-trips, folders written before it load as
    32 groups, and the official layout, which cannot say it, refuses anything but 32."""
    import dataclasses
    import json

    cfg = dataclasses.replace(ibq_preset("debug"), norm_groups=8)
    torch.manual_seed(0)
    m = IBQ(cfg).eval()
    assert m.encoder.down[0].block[0].norm1.num_groups == 8 and m.decoder.norm_out.num_groups == 8
    save_ibq(m, tmp_path / "ours")
    x = images(1, 64, 64, seed=3)
    assert load_ibq(tmp_path / "ours").config.norm_groups == 8
    assert torch.equal(load_ibq(tmp_path / "ours").encode(x), m.encode(x))
    with pytest.raises(ValueError, match="norm_groups=8"):
        save_ibq(m, tmp_path / "official", layout="official")
    assert not (tmp_path / "official").exists()  # refused before anything is written
    old = IBQ(ibq_preset("debug"))
    save_ibq(old, tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    del raw["norm_groups"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    assert load_ibq(tmp_path / "old").config.norm_groups == 32
    assert load_ibq(tmp_path / "old").config.patch_shortcut is False
    with pytest.raises(ValueError, match="base_channels.*norm_groups=64"):
        dataclasses.replace(ibq_preset("debug"), norm_groups=64)
    with pytest.raises(ValueError, match="norm_groups"):
        dataclasses.replace(ibq_preset("debug"), norm_groups=0)


def test_patch_shortcut(tmp_path):
    """The linear patch path: encode/decode/forward agree with the path written out by hand, the
    folder round-trips, and the official layout refuses it."""
    import dataclasses

    torch.manual_seed(0)
    m = IBQ(dataclasses.replace(ibq_preset("debug"), patch_shortcut=True)).eval()
    x = images(2, 64, 64, seed=4)
    z = m.quant_conv(m.encoder(x)) + m.patch_in(x)
    codes = m.quantize.codes(z)
    assert torch.equal(m.encode(x), codes)
    with torch.no_grad():
        e = m.quantize.lookup(codes)
        by_hand = (m.decoder(m.post_quant_conv(e)) + m.patch_out(e)).clamp(-1, 1)
        assert torch.allclose(m.decode(codes), by_hand, atol=1e-6)
        assert torch.equal(m(x)[1], codes)
    save_ibq(m, tmp_path / "ours")
    loaded = load_ibq(tmp_path / "ours")
    assert loaded.config.patch_shortcut and torch.equal(loaded.encode(x), codes)
    with pytest.raises(ValueError, match="patch_shortcut=True"):
        save_ibq(m, tmp_path / "official", layout="official")
    assert not (tmp_path / "official").exists()  # refused before anything is written


def test_checkpoint_bad_tensors(model, tmp_path):
    save_ibq(model, tmp_path, layout="official")
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True)
    ckpt["state_dict"]["quantize.embedding.weight"] = torch.zeros(255, 32)
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight.*\(255, 32\).*\(256, 32\)"):
        load_ibq(tmp_path)
    del ckpt["state_dict"]["quantize.embedding.weight"]
    del ckpt["state_dict"]["encoder.down.2.block.0.nin_shortcut.weight"]
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"encoder\.down\.2\.block\.0\.nin_shortcut\.weight"):
        load_ibq(tmp_path)


def test_load_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="config.yaml.*model.ckpt.*config.json.*model.safetensors"):
        load_ibq(tmp_path)


def test_input_validation(model):
    with pytest.raises(ValueError, match=r"images.*16"):
        model.encode(images(1, 64, 40))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="base_channels"):
        IBQConfig(base_channels=48)
    with pytest.raises(ValueError, match="num_res_blocks"):
        IBQConfig(num_res_blocks=0)
    with pytest.raises(ValueError, match="debug.*demo.*emu3.5"):
        ibq_preset("huge")


def test_presets():
    assert ibq_preset("debug").downsample_factor == 16
    assert ibq_preset("demo").downsample_factor == 8
    official = ibq_preset("emu3.5")
    assert official.downsample_factor == 16 and len(official.channel_mult) == 5
    assert (official.codebook_size, official.embed_dim) == (131072, 256)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in IBQ(official).parameters())
    assert 440e6 < num_params < 470e6  # paper 2.3: 455M


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (1000, 17), (64, 64)])
def test_resize_to_area(size):
    area, patch = 128 * 128, 16
    image = Image.new("RGB", size, (10, 200, 30))
    out = resize_to_area(image, area, patch)
    w, h = out.size
    assert w % patch == 0 and h % patch == 0 and w >= patch and h >= patch
    scale = math.sqrt(area / (size[0] * size[1]))
    for side, target in ((w, size[0] * scale), (h, size[1] * scale)):
        assert side == patch or abs(side - target) <= patch / 2  # nearest multiple, at least one patch
    if min(size) > 100:  # no side clipped to one patch: area and aspect are kept within rounding
        assert abs(w * h / area - 1) < 0.25
        assert abs((w / h) / (size[0] / size[1]) - 1) < 0.15
    assert out.getpixel((w // 2, h // 2)) == (10, 200, 30)


def test_resize_to_area_rejects_small_inputs():
    with pytest.raises(ValueError, match="patch"):
        resize_to_area(Image.new("RGB", (10, 40)), 64 * 64, 16)
    with pytest.raises(ValueError, match="area"):
        resize_to_area(Image.new("RGB", (64, 64)), 100, 16)


def test_pixel_round_trip_is_exact():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    pixels[0, 0] = (0, 127, 255)
    t = to_tensor(pixels)
    assert t.shape == (3, 17, 23) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])
    assert torch.equal(to_tensor(Image.fromarray(pixels)), t)
    assert np.array_equal(np.asarray(to_pil(t)), pixels)
    assert np.asarray(to_pil(torch.full((3, 2, 2), 3.0))).max() == 255  # out of range saturates
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(pixels.astype(np.float32))


def test_sim_ibq_init_factor_and_width():
    """train.sim.ibq_init's CPU tokenizer: factor 8 is the shipped design, factor 4 codes 4x4 patches (a 16x16
    image gives a 4x4 grid), and an unknown factor is refused by name."""
    from train.sim.ibq_init import demo_small_config

    assert demo_small_config().downsample_factor == 8 and demo_small_config().base_channels == 32
    cfg = demo_small_config(norm_groups=8, patch_shortcut=True, factor=4, base_channels=40)
    torch.manual_seed(0)
    with torch.no_grad():
        assert IBQ(cfg).encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="factor"):
        demo_small_config(factor=2)
