"""Train a vidgen model: `python train.py experiment=quickstart_vae` (any Hydra override works)."""

import hydra
from omegaconf import DictConfig

from vidgen.errors import one_line_errors
import vidgen.config  # noqa: F401  (registers the config resolvers)
from vidgen.training.recipe import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
