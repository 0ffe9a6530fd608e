"""Checkpoint evaluation: Fréchet distance vs closed form, FVD through a TorchScript file, CLIP score by hand,
weight-free metrics on synthetic videos, and eval.py end to end (2 checkpoints x 2 prompts x 2 seeds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.demo_data import demo_captions
from test_dit_training import make_tiny_vae_export
from vidgen.eval.clip_score import CLIPScorer
from vidgen.eval.compare import EvalError, checkpoint_labels, read_prompts, scene_scores
from vidgen.eval.fvd import I3DFeatures, feature_stats, frechet_distance, fvd_from_features, load_i3d
from vidgen.eval.video_metrics import caption_distances, diversity, flicker, motion, pool_blocks, scene_distance
from vidgen.io.checkpoint import main as export_main
from vidgen.io.video import read_video

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


# ------------------------------------------------------------------------------------------ Fréchet distance / FVD
@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_of_diagonal_gaussians_is_closed_form(method):
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-10)
    # from large samples of the two Gaussians (float64 statistics)
    a = m1 + np.sqrt(s1) * rng.standard_normal((200_000, 6))
    b = m2 + np.sqrt(s2) * rng.standard_normal((200_000, 6))
    assert fvd_from_features(a, b, method=method) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_scipy_and_eigh_agree_on_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    d_scipy = frechet_distance(m1, s1, m2, s2, method="scipy")
    assert d_scipy == pytest.approx(frechet_distance(m1, s1, m2, s2, method="eigh"), rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fvd_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(2).normal(size=(40, 16)) * 3 + 1
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    for method in ("scipy", "eigh"):
        assert fvd_from_features(feats, feats, method=method) == pytest.approx(0.0, abs=1e-6)
    assert fvd_from_features(feats, feats + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)  # mean shift only


class TinyI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: same call signature, insists on the FVD input convention."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=(2, 8, 8), stride=(1, 8, 8))
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224 or x.min() < -1.0 or x.max() > 1.0:
            raise ValueError("expected [B, 3, T, 224, 224] in [-1, 1]")
        if rescale or resize:
            raise ValueError("expected rescale=False, resize=False")
        h = self.conv(x).mean(dim=(2, 3, 4))
        return h if return_features else torch.softmax(self.head(h), dim=-1)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def test_fvd_through_a_torchscript_file(tiny_i3d):
    net = TinyI3D()
    net.load_state_dict(torch.jit.load(str(tiny_i3d)).state_dict())
    i3d = I3DFeatures(load_i3d(tiny_i3d), frames=4, batch_size=3)
    x = torch.rand(5, 3, 6, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = i3d(x)
    # by hand: first 4 frames, each frame bilinearly resized to 224x224, features before the head
    frames = x[:, :, :4].permute(0, 2, 1, 3, 4).reshape(-1, 3, 24, 40)
    resized = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    resized = resized.reshape(5, 4, 3, 224, 224).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        expected = net(resized, return_features=True).double().numpy()
    assert feats.dtype == np.float64 and feats.shape == (5, 6)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    assert fvd_from_features(feats, i3d(x)) == pytest.approx(0.0, abs=1e-9)
    assert fvd_from_features(feats, i3d((x * 0.5 + 0.4).clamp(-1, 1))) > 1e-4
    with pytest.raises(FileNotFoundError, match="i3d="):
        load_i3d(tiny_i3d.parent / "missing.pt")


# ------------------------------------------------------------------------------------------ CLIP score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random tiny CLIPModel + a character-level CLIP tokenizer + a preprocessor config, saved locally."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return folder


def test_clip_score_equals_a_hand_computation(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    scorer = CLIPScorer.from_pretrained(tiny_clip)
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip, local_files_only=True)(["a red car"], return_tensors="pt")
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
              - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    cos = F.cosine_similarity(img, txt, dim=-1)  # [T]
    np.testing.assert_allclose((100 * scorer.image_embeds(frames) @ scorer.text_embeds(["a red car"])[0]).numpy(),
                               (100 * cos).numpy(), rtol=1e-4, atol=1e-4)
    assert scorer.score(frames, "a red car") == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-4)
    # negative alignment clamps to 0 (torchmetrics' max(score, 0))
    scorer.model.text_projection.weight.data.neg_()
    assert scorer.score(frames, "a red car") == pytest.approx(max(-100 * cos.mean().item(), 0.0), abs=1e-4)


def test_clip_preprocessing_matches_the_hf_image_processor(tiny_clip):
    from transformers import CLIPImageProcessorPil

    scorer = CLIPScorer.from_pretrained(tiny_clip)
    frames = np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)  # resize + crop needed
    reference = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=list(frames), return_tensors="pt")
    ours = scorer.preprocess(frames)
    assert ours.shape == reference["pixel_values"].shape == (2, 3, 32, 32)
    # in 8-bit levels: PIL resizes in two uint8-rounded passes, torch in float, so noise differs by rounding
    levels = ((ours - reference["pixel_values"]) * torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) * 255).abs()
    assert levels.mean() < 0.5 and (levels > 1.5).float().mean() < 0.02


# ------------------------------------------------------------------------------------------ weight-free metrics
def test_flicker_motion_diversity_on_synthetic_videos():
    ramp = np.stack([np.full((4, 6, 3), 10 * t, np.uint8) for t in range(5)])  # brightness +10 per frame
    assert flicker(ramp) == pytest.approx(10.0)
    assert motion(ramp, stride=4) == pytest.approx(40.0) and motion(ramp, stride=2) == pytest.approx(20.0)
    assert motion(ramp, stride=9) == pytest.approx(40.0)  # k = min(stride, T - 1)
    blink = np.stack([np.full((4, 6, 3), 255 * (t % 2), np.uint8) for t in range(5)])  # no uint8 wrap-around
    assert flicker(blink) == pytest.approx(255.0) and motion(blink, stride=2) == pytest.approx(0.0)
    still = np.full((5, 4, 6, 3), 77, np.uint8)
    assert flicker(still) == motion(still) == 0.0
    half = still.copy()
    half[:, :, :3] = 97  # half the pixels differ by 20
    assert diversity([still, half]) == pytest.approx(10.0)
    assert diversity([still, half, still]) == pytest.approx((10 + 0 + 10) / 3)
    assert np.isnan(diversity([still])) and np.isnan(flicker(still[:1]))


def test_prompt_file_and_checkpoint_labels(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("a red car\n\nbikes at dusk\n")
    assert read_prompts(plain, [0, 1]) == [{"prompt": "a red car", "name": "000_a_red_car", "seeds": [0, 1]},
                                           {"prompt": "bikes at dusk", "name": "001_bikes_at_dusk", "seeds": [0, 1]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 5, "name": "x"}\n{"prompt": "b", "seed": [1, 2]}\n')
    assert [(p["name"], p["seeds"]) for p in read_prompts(jsonl, [0])] == [("x", [5]), ("001_b", [1, 2])]
    jsonl.write_text('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n')
    with pytest.raises(EvalError, match="duplicate names"):
        read_prompts(jsonl, [0])
    with pytest.raises(EvalError, match="no repeats"):
        read_prompts(plain, [1, 1])
    jsonl.write_text('{"prompt": "a", "name": "../x"}\n')
    with pytest.raises(EvalError, match="file name"):
        read_prompts(jsonl, [0])
    assert checkpoint_labels(["runs/r1/checkpoints/last.ckpt", "runs/r1/checkpoints/last.ckpt", "exports/ft"]) == \
        ["r1-last", "r1-last-2", "ft"]


# ------------------------------------------------------------------------------------------ eval.py end to end
@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    clips = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return make_tiny_vae_export(tmp_path_factory.mktemp("tiny_vae"), clips)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, demo_shards, tiny_vae_dir) -> Path:
    """`train.py experiment=quickstart_dit` shrunk to a tiny DiT / 2 steps at 5x32x32; returns last.ckpt."""
    tmp = tmp_path_factory.mktemp("dit_run")
    out = run("train.py", "experiment=quickstart_dit", f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/run",
              f"data.train_shards={demo_shards}", "data.buckets=[[5,32,32]]", f"task.module.vae_path={tiny_vae_dir}",
              "model.dit.dim=32", "model.dit.depth=1", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
              "model.dit.freq_dim=32", "model.text.dim=32", "model.text.depth=1", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
              "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_logging.prompts=[bikes]",
              "callbacks.sample_logging.num_frames=5", "callbacks.sample_logging.height=32",
              "callbacks.sample_logging.width=32", "callbacks.sample_logging.steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_scene_distance_and_caption_match():
    red = np.zeros((3, 8, 8, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((3, 8, 8, 3), np.uint8)
    blue[..., 2] = 200
    checker = (np.indices((8, 8)).sum(0) % 2 * 40 - 20)[None]  # +-20 per pixel, mean 0 per 2x2 block
    noisy_red = red.copy()
    noisy_red[..., 0] = 200 + checker
    assert scene_distance(noisy_red, red, pool=2) == pytest.approx(0.0)
    assert scene_distance(noisy_red, red, pool=1) == pytest.approx(20 / 3)  # only the red channel differs
    assert scene_distance(red, blue) == pytest.approx(400 / 3)
    assert scene_distance(red[:2], blue) == pytest.approx(400 / 3)  # the first min(T_a, T_b) frames
    dim_red = (red // 2).astype(np.uint8)
    scenes = {"a red room": [pool_blocks(c, 2) for c in (blue, dim_red, red)], "a blue sky": [pool_blocks(blue, 2)]}
    assert caption_distances(noisy_red, scenes, pool=2) == {"a red room": pytest.approx(0.0),
                                                              "a blue sky": pytest.approx(400 / 3)}
    own = scene_scores(noisy_red, "a red room ", scenes, pool=2)  # prompts compare stripped
    assert own["nearest_caption"] == "a red room" and own["caption_match"] == 1.0
    assert own["caption_margin"] == pytest.approx(400 / 3)
    wrong = scene_scores(noisy_red, "a blue sky", scenes, pool=2)
    assert wrong["caption_match"] == 0.0 and wrong["caption_margin"] == pytest.approx(-400 / 3)
    other = scene_scores(noisy_red, "a green field", scenes, pool=2)
    assert other["caption_match"] is None and other["caption_margin"] is None
    with pytest.raises(ValueError, match="one frame size"):
        scene_distance(red, blue[:, :4])


def test_eval_py_end_to_end(trained_ckpt, tmp_path, demo_shards, tiny_i3d, tiny_clip):
    export = tmp_path / "export"
    assert export_main([str(trained_ckpt), str(export)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bikes on a road\na bunny in a field\n")
    out_dir = tmp_path / "eval"
    res = run("eval.py", f"ckpts=[{trained_ckpt},{export}]", f"prompts_file={prompts}", "seeds=[3,7]",
              "num_frames=5", "height=32", "width=32", "steps=2", "guidance=3.0", "batch_size=3",
              f"i3d={tiny_i3d}", f"real_shards={demo_shards}", "real_clips=4", f"clip={tiny_clip}",
              f"out_dir={out_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sampling" in res.stderr  # the tqdm bar
    metrics = json.loads((out_dir / "metrics.json").read_text())
    labels = [c["label"] for c in metrics["checkpoints"]]
    assert labels == ["run-last", "export"] and metrics["skipped"] == {}
    mp4s = []
    for c in metrics["checkpoints"]:
        agg = c["aggregate"]
        assert agg["videos"] == 4 and agg["fvd_videos"] == 4 and agg["fvd_real_clips"] == 4
        assert all(isinstance(agg[k], float) for k in ("fvd", "clip_score", "flicker", "motion", "diversity"))
        assert [p["prompt"] for p in c["prompts"]] == ["bikes on a road", "a bunny in a field"]
        for p in c["prompts"]:
            assert [v["seed"] for v in p["videos"]] == [3, 7] and p["diversity"] > 0
            for v in p["videos"]:
                assert (out_dir / v["png"]).is_file()
                assert json.loads((out_dir / v["json"]).read_text())["seed"] == v["seed"]
                assert read_video(out_dir / v["mp4"])[0].shape == (5, 32, 32, 3)
                mp4s.append(v["mp4"])
    assert len(set(mp4s)) == 8
    a, b = metrics["checkpoints"]  # the export samples exactly what its checkpoint samples
    assert a["aggregate"]["fvd"] == pytest.approx(b["aggregate"]["fvd"], rel=1e-6)
    assert a["aggregate"]["clip_score"] == pytest.approx(b["aggregate"]["clip_score"], abs=1e-5)
    seeds_differ = read_video(out_dir / a["prompts"][0]["videos"][0]["mp4"])[0] != \
        read_video(out_dir / a["prompts"][0]["videos"][1]["mp4"])[0]
    assert seeds_differ.any()
    page = (out_dir / "report.html").read_text()
    assert "src='http" not in page and page.count("data:image/png;base64,") >= 1 + 8 + 8  # chart, thumbs, sheets
    for c in metrics["checkpoints"]:
        for p in c["prompts"]:
            for v in p["videos"]:
                assert f"{c['label']} seed {v['seed']}" in page and f"href='{v['mp4']}'" in page
    assert "bikes on a road" in page and "a bunny in a field" in page
    # real_shards also gives each video its distance to every caption's real clips (none of these prompts is one)
    captions = {c.strip() for c in demo_captions().values()}
    for c in metrics["checkpoints"]:
        for p in c["prompts"]:
            for v in p["videos"]:
                assert set(v["caption_distances"]) <= captions and v["nearest_caption"] in v["caption_distances"]
                assert all(0 <= d <= 255 for d in v["caption_distances"].values()) and v["caption_match"] is None
    assert "Distance to each caption's real clips" in page
    assert (out_dir / "report.md").is_file() and (out_dir / "metrics.png").is_file()
    assert not (ROOT / "outputs").exists() and not (ROOT / ".hydra").exists()


def test_eval_py_skips_weighted_metrics_and_names_bad_settings(trained_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bikes\n")
    out_dir = tmp_path / "eval"
    res = run("eval.py", f"ckpts=[{trained_ckpt}]", f"prompts_file={prompts}", "seeds=[0]", "num_frames=5",
              "height=32", "width=32", "steps=1", f"out_dir={out_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["skipped"]) == {"fvd", "clip_score"}
    agg = metrics["checkpoints"][0]["aggregate"]
    assert agg["clip_score"] is None and "fvd" not in agg and agg["diversity"] is None  # one seed: no pairs
    assert "fvd skipped" in (out_dir / "report.html").read_text()
    bad = run("eval.py", f"ckpts=[{trained_ckpt}]", f"prompts_file={prompts}", f"i3d={tmp_path}/i3d.pt",
              f"out_dir={tmp_path}/bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: i3d=")


# ------------------------------------------------------------------------------------------ scripts/plot_losses.py
def test_plot_losses_overlays_several_runs(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_losses", ROOT / "scripts" / "plot_losses.py")
    plot_losses = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_losses)
    for r, scale in (("run_a", 1.0), ("run_b", 0.5)):
        (tmp_path / r / "csv").mkdir(parents=True)
        rows = ["step,train/loss,val/loss"] + [f"{s},{scale / (s + 1)}," for s in range(30)] + [f"29,,{scale * 0.1}"]
        (tmp_path / r / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    single = tmp_path / "one.png"
    assert plot_losses.main([str(tmp_path / "run_a" / "csv" / "metrics.csv"), str(single)]) == 0  # today's usage
    both = tmp_path / "both.png"
    assert plot_losses.main([str(tmp_path / "run_a"), str(tmp_path / "run_b"), str(both)]) == 0
    assert single.stat().st_size > 0 and both.stat().st_size > 0 and "2 run(s)" in capsys.readouterr().out
    assert plot_losses.run_label(tmp_path / "run_b" / "csv" / "metrics.csv",
                                 tmp_path / "run_b" / "csv" / "metrics.csv") == "run_b"
    assert plot_losses.main([str(tmp_path / "run_a"), str(tmp_path / "nothing"), str(both)]) == 2
    assert plot_losses.main([str(tmp_path / "run_a"), str(both), "--labels", "x,y"]) == 2
