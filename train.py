"""Train a vidgen model: `python train.py experiment=quickstart_vae` (any Hydra override works)."""

import hydra
from omegaconf import DictConfig

import vidgen.config  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from vidgen.training.recipe import train

    train(cfg)


if __name__ == "__main__":
    main()
