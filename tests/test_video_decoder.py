"""Video decoder (model/video_decoder.py, model/video_sampling.py, train/video_decoder.py): shapes, mask
semantics, the scheduler contract, training, distillation and evaluation smoke runs."""

import json
import math
import os

import numpy as np
import pytest
import torch

from model.video_decoder import VideoDecoder, bilateral_flow, clean_blend, motion_blend, video_decoder_preset
from model.video_sampling import (DecoderSettings, build_conditions, euler_segment, load_video_decoder,
                                  make_scheduler, pad_frames, sample_video, save_video_decoder, set_schedule,
                                  shifted, text_to_bytes)
from model.vision_tokenizer import IBQ, ibq_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ibq():
    torch.manual_seed(0)
    return IBQ(ibq_preset("debug")).eval()


@pytest.fixture(scope="module")
def model():
    """The debug decoder with its zero-initialised output layers randomised, so every input can show."""
    torch.manual_seed(1)
    m = VideoDecoder(**video_decoder_preset("debug", 32)).eval()
    with torch.no_grad():
        for layer in [m.patch_out, m.ada_out] + [b.ada for b in m.blocks]:
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    return m


def inputs(B=2, Fn=8, H=32, W=32, D=32, h=2, w=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, Fn)
    mask[:, 0] = mask[:, -1] = 1
    return dict(latents=torch.randn(B, 3, Fn, H, W, generator=g), timestep=torch.tensor([900.0, 250.0])[:B],
                clean=mask.clone(), mask=mask, keyframe_embeds=torch.randn(B, D, Fn, h, w, generator=g))


# ---------------------------------------------------------------------------------------- the network

@torch.no_grad()
def test_forward_shapes(model):
    for Fn, H, W in ((8, 32, 32), (4, 32, 48), (12, 16, 24)):
        x = inputs(Fn=Fn, H=H, W=W)
        assert model(**x).shape == (2, 3, Fn, H, W)
    # AdaLN-Zero: the network's residual starts at 0, so x0 starts as the blend of the clean frames
    x = inputs()
    sigma = torch.tensor([0.9, 0.25])[:, None, None, None, None]
    fresh = VideoDecoder(**video_decoder_preset("debug", 32))
    assert torch.allclose(fresh(**x), (x["latents"] - clean_blend(x["latents"], x["clean"])) / sigma, atol=1e-6)
    no_prior = VideoDecoder(**video_decoder_preset("debug", 32), blend_prior=False)
    assert torch.allclose(no_prior(**x), x["latents"] / sigma)
    plain = VideoDecoder(**video_decoder_preset("debug", 32), prediction_type="velocity")
    assert torch.equal(plain(**x), torch.zeros(2, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="^prediction_type:"):
        VideoDecoder(prediction_type="noise")


def test_clean_blend_by_hand():
    x = torch.tensor([10.0, 0, 0, 40, 0, 0]).reshape(1, 1, 6, 1, 1)
    blend = lambda flags: clean_blend(x, torch.tensor([flags])).flatten().tolist()  # noqa: E731
    assert blend([1, 0, 0, 1, 0, 0]) == [10, 20, 30, 40, 40, 40]
    assert blend([0, 0, 0, 1, 0, 0]) == [40] * 6
    assert blend([0] * 6) == [0] * 6


@torch.no_grad()
def test_preconditioning_limits():
    """sigma_data > 0, untrained (zero output layer): the predicted clean frames are the noisy frames
    themselves as sigma -> 0 and the blend of the clean frames at sigma = 1; bad settings are refused."""
    m = VideoDecoder(**video_decoder_preset("debug", 32), sigma_data=0.25).eval()
    x = inputs()
    blend = clean_blend(x["latents"], x["clean"])
    B = x["latents"].shape[0]
    with torch.no_grad():
        for sigma, expect in ((1e-4, x["latents"]), (1.0, blend)):
            v = m(**{**x, "timestep": torch.full((B,), sigma * 1000.0)})
            x0 = x["latents"] - max(sigma, 0.05) * v
            assert torch.allclose(x0, expect, atol=1e-3), sigma
    for kw in (dict(sigma_data=-1.0), dict(sigma_data=0.5, blend_prior=False),
               dict(sigma_data=0.5, prediction_type="velocity")):
        with pytest.raises(ValueError, match="sigma_data"):
            VideoDecoder(**video_decoder_preset("debug", 32), **kw)


def panning(frames=8, step=2, size=32):
    """(1, 3, frames, size, size): a smooth random texture panning right by `step` px a frame."""
    g = torch.Generator().manual_seed(3)
    wide = torch.nn.functional.avg_pool2d(torch.rand(1, 3, size, size + step * frames + 8, generator=g), 3, 1, 1)
    x0 = step * frames
    return torch.stack([wide[0, :, :, x0 - step * k:x0 - step * k + size] for k in range(frames)], dim=1)[None] * 2 - 1


@torch.no_grad()
def test_motion_blend_follows_motion():
    """Between two clean frames of a pan, the motion-compensated blend is the true in-between frame
    (away from the borders the pan brings in), where the linear blend ghosts; frames without a clean
    frame on both sides are the linear blend's."""
    video = panning()
    clean = torch.zeros(1, 8)
    clean[0, [0, 4]] = 1
    motion, linear = motion_blend(video, clean), clean_blend(video, clean)
    inner = (slice(None), slice(None), slice(1, 4), slice(None), slice(10, -10))
    assert ((motion - video)[inner] ** 2).mean() < 1e-6 < 1e-3 < ((linear - video)[inner] ** 2).mean()
    assert torch.equal(motion[:, :, 4:], linear[:, :, 4:]) and torch.equal(motion[:, :, 0], video[:, :, 0])
    flow = bilateral_flow(video[:, :, 0], video[:, :, 4])
    inside = flow[0, :, 8:-8, 8:-8]  # away from the borders
    assert torch.all(inside[0] == 8) and torch.all(inside[1] == 0)  # 4 frames x 2 px, no dy
    none = torch.zeros(1, 8)
    assert torch.equal(motion_blend(video, none), clean_blend(video, none))


@torch.no_grad()
def test_motion_prior_decoder():
    """motion_prior: the untrained decoder predicts the even mix of the linear and motion-compensated
    blends (its gate starts at 0.5); the sampler's precomputed blend (Conditions.model_kwargs) gives what
    forward computes itself; the prior needs blend_prior and 'sample' prediction."""
    m = VideoDecoder(**video_decoder_preset("debug", 32), motion_prior=True).eval()
    video = panning()
    x = dict(inputs(B=1), latents=torch.where(torch.arange(8)[None, None, :, None, None] % 7 == 0, video,
                                              torch.randn(1, 3, 8, 32, 32)))
    x["timestep"] = torch.tensor([600.0])
    linear, motion = clean_blend(x["latents"], x["clean"]), motion_blend(x["latents"], x["clean"])
    x0 = x["latents"] - 0.6 * m(**x)
    assert torch.allclose(x0, (linear + motion) / 2, atol=1e-5)
    given = torch.where(x["clean"][:, None, :, None, None] > 0, x["latents"], torch.zeros(()))
    cond = build_conditions(video[0, :, [0, 7]].permute(1, 0, 2, 3)[None], [[0, 7]], 8, IBQ(ibq_preset("debug")))
    assert torch.allclose(cond.given, given) and cond.motion is None
    kw = cond.model_kwargs(m)
    assert torch.equal(kw["motion"], motion_blend(given, cond.clean)) and cond.model_kwargs(m)["motion"] is kw["motion"]
    assert "motion" not in cond.model_kwargs(VideoDecoder(**video_decoder_preset("debug", 32)))
    for kw in (dict(blend_prior=False), dict(prediction_type="velocity")):
        with pytest.raises(ValueError, match="motion_prior"):
            VideoDecoder(**video_decoder_preset("debug", 32), motion_prior=True, **kw)


def test_tokens_of_frames_outside_the_mask_are_ignored(model):
    x = inputs()
    base = model(**x)
    hidden = dict(x, keyframe_embeds=x["keyframe_embeds"].clone())
    hidden["keyframe_embeds"][:, :, 1:7] = 5.0  # frames 1..6 have mask 0
    assert torch.equal(model(**hidden), base)
    shown = dict(x, keyframe_embeds=x["keyframe_embeds"].clone())
    shown["keyframe_embeds"][:, :, 0] += 1.0  # frame 0 has mask 1
    assert not torch.allclose(model(**shown), base, atol=1e-4)
    flags = dict(x, mask=x["mask"].clone())
    flags["mask"][:, 3] = 1.0  # the 4-channel mask itself is an input
    assert not torch.allclose(model(**flags), base, atol=1e-4)


@torch.no_grad()
def test_text(model):
    x = inputs()
    base = model(**x)
    empty = torch.zeros(2, 8, 16, dtype=torch.long)
    assert torch.equal(model(**x, text_bytes=empty), base)  # no text = no text argument
    said = text_to_bytes(["turn left"] * 16, 16).reshape(2, 8, 16)
    assert not torch.allclose(model(**x, text_bytes=said), base, atol=1e-4)
    assert text_to_bytes(["é", None], 4).tolist() == [[0xC3 + 1, 0xA9 + 1, 0, 0], [0, 0, 0, 0]]


def test_config_round_trip(tmp_path, model, ibq):
    save_video_decoder(str(tmp_path / "vd"), model, ibq, DecoderSettings(frame_size=(32, 32), num_steps=3))
    loaded, ibq2, settings = load_video_decoder(str(tmp_path / "vd"))
    assert settings.frame_size == (32, 32) and settings.num_steps == 3 and settings.shift == 3.0
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))
    assert json.loads((tmp_path / "vd" / "config.json").read_text())["_class_name"] == "VideoDecoder"
    with pytest.raises(ValueError, match="^video_decoder:"):
        load_video_decoder(str(tmp_path))


def test_package_ships_fp16_within_the_budget(tmp_path, model, ibq):
    """train.sim.package --video-decoder: fp16 files that load back as float32 and sample like the
    original in fp16; the 80 MB budget counts the other folders under assets/ too."""
    from safetensors import safe_open

    from train.sim.package import package_video

    src, assets = tmp_path / "run" / "step_000010", tmp_path / "assets"
    save_video_decoder(str(src), model, ibq, DecoderSettings(frame_size=(32, 32), num_steps=3))
    (assets / "demo").mkdir(parents=True)
    (assets / "demo" / "weights.bin").write_bytes(b"0" * 2 ** 20)  # 1 MB of world model beside it
    out = package_video(str(src), str(assets / "video_decoder"))
    assert out["assets_mb"] == pytest.approx(out["mb"] + 1.0, abs=0.01)
    with safe_open(str(assets / "video_decoder" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    loaded, ibq2, settings = load_video_decoder(str(assets / "video_decoder"))
    assert next(loaded.parameters()).dtype == torch.float32 and settings.num_steps == 3
    x = inputs()
    with torch.no_grad():
        half = VideoDecoder.from_config(model.config).eval()
        half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        assert torch.allclose(loaded(**x), half(**x), atol=1e-5)
    with pytest.raises(ValueError, match="size:.*budget"):
        package_video(str(src), str(assets / "video_decoder"), max_mb=out["mb"] + 0.5)
    assert load_video_decoder(str(assets / "video_decoder"))[2].num_steps == 3  # a refusal leaves it as it was
    package_video(str(src), str(assets / "video_decoder"), num_steps=4)  # the steps it ships with
    assert load_video_decoder(str(assets / "video_decoder"))[2].num_steps == 4
    distilled = tmp_path / "distilled"
    save_video_decoder(str(distilled), model, ibq, DecoderSettings(frame_size=(32, 32), num_steps=2, teacher_steps=8))
    for steps, field in ((0, "num_steps: must be a positive"), (4, "num_steps: .* is distilled for 2 steps")):
        with pytest.raises(ValueError, match=field):
            package_video(str(distilled), str(assets / "video_decoder"), num_steps=steps)


# ---------------------------------------------------------------------------------------- scheduler

def test_scheduler_contract():
    sched = make_scheduler(3.0)
    sigmas = set_schedule(sched, 4)
    # base grid 1, 3/4, 1/2, 1/4 under shift 3: 3b / (1 + 2b) -> 1, 0.9, 0.75, 0.5; then the terminal 0
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(sched.timesteps, 1000 * sigmas[:-1])
    assert bool((sched.timesteps[1:] < sched.timesteps[:-1]).all())
    unshifted = set_schedule(make_scheduler(1.0), 4)
    assert torch.allclose(unshifted, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), atol=1e-6)
    assert torch.allclose(shifted(unshifted, 3.0), sigmas, atol=1e-6)
    # distillation relies on the 4-step grid being every 8th point of the 32-step one
    assert torch.allclose(set_schedule(make_scheduler(3.0), 32)[::8], sigmas, atol=1e-6)
    with pytest.raises(ValueError, match="^shift:"):
        make_scheduler(0)


def test_sampler_reaches_the_data():
    """With the exact velocity of a known clip, every step count lands exactly on it (sigma ends at 0),
    and the scheduler-driven sampler agrees with plain Euler steps on the same grid."""
    torch.manual_seed(0)
    target = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    cond = build_conditions(target[:, :, [0, 7]].permute(0, 2, 1, 3, 4), [[0, 7]], 8,
                            IBQ(ibq_preset("debug")).eval())

    def oracle(x, t, **_):  # x = s*noise + (1-s)*target  =>  v = noise - target = (x - target) / s
        return (x - target) / (t[:, None, None, None, None] / 1000.0)

    for steps in (1, 4, 32):
        out = sample_video(oracle, cond, num_steps=steps, shift=3.0, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(out, target, atol=1e-5), steps
    model = lambda x, t, **kw: torch.tanh(x) * (t[:, None, None, None, None] / 1000.0)  # noqa: E731
    sch = sample_video(model, cond, num_steps=5, shift=2.0, generator=torch.Generator().manual_seed(3))
    x = torch.randn(cond.given.shape, generator=torch.Generator().manual_seed(3))
    grid = set_schedule(make_scheduler(2.0), 5)[None]
    from model.video_sampling import write_back

    manual = euler_segment(model, write_back(x, cond), grid, cond).clamp(-1, 1)
    assert torch.allclose(sch, manual, atol=1e-5)


@torch.no_grad()
def test_given_frames_are_reproduced_exactly(model, ibq):
    keys = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    cond = build_conditions(keys, [[0, 4, 9], [0, 2, 9]], 10, ibq, texts=[["a", "b"], [None, "c"]],
                            text_bytes=16, clean=[[True, True, True], [True, False, True]])
    assert cond.given.shape == (2, 3, pad_frames(10), 32, 32) == (2, 3, 12, 32, 32)
    assert cond.mask[1].tolist() == [1, 0, 1] + [0] * 6 + [1, 0, 0]
    assert cond.clean[1].tolist() == [1, 0, 0] + [0] * 6 + [1, 0, 0]
    out = sample_video(model, cond, num_steps=3, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 10, 32, 32)
    for b, ix in enumerate([[0, 4, 9], [0, 2, 9]]):
        for s, f in enumerate(ix):
            if cond.clean[b, f]:
                assert torch.equal(out[b, :, f], keys[b, s].clamp(-1, 1)), (b, f)
    assert not torch.allclose(out[1, :, 2], keys[1, 1], atol=1e-2)  # tokens only: generated, not copied
    again = sample_video(model, cond, num_steps=3, shift=3.0, generator=torch.Generator().manual_seed(0))
    other = sample_video(model, cond, num_steps=3, shift=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out[:, :, 1:4], other[:, :, 1:4])
    with pytest.raises(ValueError, match="^indices:"):
        build_conditions(keys[:1, :2], [[3, 3]], 10, ibq)
    with pytest.raises(ValueError, match="^keyframes:"):
        build_conditions(keys[:1, :1], [[0]], 10, ibq)


# ---------------------------------------------------------------------------------------- training

def run_cfg(tmp_path, name, **kw):
    from train.video_decoder import debug_cpu

    import dataclasses

    return dataclasses.replace(debug_cpu(), out_dir=str(tmp_path / name), progress=False, **kw)


def test_training_smoke_and_resume(tmp_path):
    from train import common
    from train.video_decoder import main

    cfg = run_cfg(tmp_path, "run", steps=3, save_every=3)
    entries = main(cfg)
    assert [e["step"] for e in entries] == [1, 2, 3] and all(math.isfinite(e["loss"]) for e in entries)
    ckpt = common.latest_checkpoint(cfg.out_dir)
    model, ibq, settings = load_video_decoder(ckpt)
    assert settings.num_steps == cfg.sample_steps and settings.teacher_steps is None
    assert settings.frame_size == (32, 32) and os.path.isfile(os.path.join(cfg.out_dir, "loss.png"))
    import dataclasses

    more = main(dataclasses.replace(cfg, steps=4))  # resumes at step 3
    assert [e["step"] for e in more] == [4]
    assert [e["step"] for e in common.RunLog(cfg.out_dir).read()] == [1, 2, 3, 4]


def test_loss_falls_on_one_batch():
    from train.video_decoder import debug_cpu, make_batch, masked_mse, noisy

    cfg = debug_cpu()
    torch.manual_seed(0)
    ibq = IBQ(ibq_preset("debug")).eval()
    model = VideoDecoder(**video_decoder_preset("debug", 32))
    batch = make_batch(cfg, 1, ibq, None)
    assert batch.x0.shape == (2, 3, 8, 32, 32) and batch.weight.shape == (2, 8)
    assert torch.equal(batch.weight * batch.cond.clean, torch.zeros(2, 8))  # clean frames are not learned
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.x0.shape, generator=g)
    sigma = torch.tensor([0.7, 0.4])
    x = noisy(batch.x0, noise, sigma, batch.cond)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    losses = []
    for _ in range(40):
        loss = masked_mse(model(x, sigma * 1000, **batch.cond.model_kwargs()), noise - batch.x0, batch.weight)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_batches_follow_the_spec():
    from train.video_decoder import VideoTrainConfig, make_batch

    cfg = VideoTrainConfig(frame_size=(32, 32), num_frames=8, min_span=4, batch_size=32, clean_first_prob=0.5,
                           clean_other_prob=0.0, mid_keyframe_prob=0.0)
    torch.manual_seed(0)
    batch = make_batch(cfg, 5, IBQ(ibq_preset("debug")).eval(), None)
    first_clean = batch.cond.clean[:, 0]
    assert bool((batch.cond.mask[:, 0] == 1).all())  # the first keyframe's tokens are always given
    assert 5 < int(first_clean.sum()) < 27  # ... and its latent is clean about half of the time
    assert int(batch.cond.clean[:, 1:].sum()) == 0  # clean_other_prob 0: only the first is ever clean
    again = make_batch(cfg, 5, IBQ(ibq_preset("debug")).eval(), None)
    assert torch.equal(again.x0, batch.x0)  # a function of (seed, step)


def test_distillation_and_evaluation_smoke(tmp_path):
    from train import common
    from train.video_decoder import evaluate_video, main, write_synthetic_clips

    teacher_cfg = run_cfg(tmp_path, "teacher", steps=2, save_every=2)
    main(teacher_cfg)
    teacher = common.latest_checkpoint(teacher_cfg.out_dir)
    cfg = run_cfg(tmp_path, "student", steps=2, save_every=2, distill_from=teacher)
    entries = main(cfg)
    assert all(math.isfinite(e["loss"]) for e in entries)
    student = common.latest_checkpoint(cfg.out_dir)
    settings = load_video_decoder(student)[2]
    assert (settings.num_steps, settings.teacher_steps) == (cfg.student_steps, cfg.teacher_steps)
    assert settings.teacher == os.path.abspath(teacher)
    clips = write_synthetic_clips(str(tmp_path / "clips"), 2, 8, (40, 40), seed=3)
    result = evaluate_video(student, str(tmp_path / "clips"))
    assert {"model_psnr", "baseline_psnr", "few_step_speedup", "few_step_psnr_drop"} <= set(result)
    assert all(math.isfinite(result[k]) for k in ("model_psnr", "baseline_psnr", "few_step_speedup"))
    assert result["num_clips"] == len(clips) == 2 and result["teacher"] == os.path.abspath(teacher)
    assert (result["few_steps"], result["many_steps"]) == (cfg.student_steps, cfg.teacher_steps)


def test_metrics_by_hand():
    from train.video_decoder import crossfade, psnr

    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255 ** 2))
    fade = crossfade(np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8), 3)
    assert fade[:, 0, 0, 0].tolist() == [0, 128, 255]
