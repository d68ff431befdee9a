"""``hycomp train`` as a Hydra app: run folders, ``-m`` sweeps, ``--cfg``, the .hydra/ record.

The CLI has already validated every job of the command line and added the overrides of the
schedule-form rule (``composer.compose.full_overrides``); each job validates its composed config
again and trains it. Errors print what / where / why / fix and exit 2 (a ``SystemExit`` passes
through Hydra's error handling).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from composer.core.errors import HycompError


@hydra.main(config_path="pkg://recipes", config_name="config", version_base=None)
def hydra_train(cfg: DictConfig) -> float | None:
    from composer.recipe.validate import validate_recipe
    from composer.run.train import run
    try:
        recipe = validate_recipe(OmegaConf.to_container(cfg, resolve=True))
        summary = run(recipe, Path(HydraConfig.get().runtime.output_dir))
    except HycompError as e:
        print(e.render(), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in the run folder; resume with "
              "train.resume=<run folder>", file=sys.stderr)
        sys.exit(130)
    return summary.get("val_loss")
