"""effvid-export: what a run trained, as the artifact its family's diffusers pipeline loads.

    effvid-export run=RUN_ID out=DIR                     # format from what the run trained
    effvid-export run=RUN_ID out=DIR format=full         # the whole pipeline folder, LoRA merged
    effvid-export --help

The formats and their loaders are in `lit_models/export.py`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.run_dir import RunError, resolve_checkpoint


def run_export(cfg: DictConfig) -> dict:
    from lit_models.export import ExportError, export_run

    _, ckpt = resolve_checkpoint(cfg.ckpt or cfg.run, Path(cfg.runs_dir))
    try:
        record = export_run(ckpt, cfg.out, format=cfg.format, weights=cfg.weights, overwrite=cfg.overwrite)
    except ExportError as error:
        raise RunError(str(error)) from None
    print(f"effvid-export: {record.format} of run {record.run} (step {record.step}, {record.weights} weights, "
          f"trained {record.trained}) -> {cfg.out}")
    if record.lora_rank is not None:
        print(f"  LoRA rank {record.lora_rank}, alpha {record.lora_alpha:g} (scale {record.lora_alpha / record.lora_rank:g})")
    print(f"  load with: {record.loads_with}")
    return vars(record)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run_export(cfg)
    except RunError as error:
        raise SystemExit(f"effvid-export: error: {error}") from None


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
