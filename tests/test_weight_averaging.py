"""ForeachEMA: the same average as Lightning's EMAWeightAveraging, float for float."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from experiments.weight_averaging import ForeachEMA, ema_update_


class TinyRegression(L.LightningModule):
    """A trained layer beside a frozen one, a -inf mask buffer (open_clip's causal mask) and
    an integer buffer: every kind of tensor the average walks."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.count += 1
        (x,) = batch
        return (self.layer(self.frozen(x)) - x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def test_ema_update_matches_get_ema_avg_fn_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    averaged = [torch.randn(5, 3, generator=generator), torch.full((2, 2), float("-inf")).triu(1), torch.arange(4)]
    current = [torch.randn(5, 3, generator=generator), averaged[1].clone(), torch.arange(4) * 3]
    expected = [get_ema_avg_fn(0.99)(a, c, None).to(a.dtype) for a, c in zip(averaged, current)]
    ema_update_(averaged, current, 0.99)
    for got, want in zip(averaged, expected):
        assert torch.equal(got, want)  # incl. the -inf entries, which a lerp would make NaN


def fit_average(callback: EMAWeightAveraging, tmp_path: str) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = TinyRegression()
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert isinstance(callback._average_model, AveragedModel) and int(callback._average_model.n_averaged) == 6
    return {k: v.clone() for k, v in module.state_dict().items()}  # the average, copied in at train end


@pytest.mark.parametrize("use_buffers", [True, False])
def test_foreach_ema_gives_lightnings_average_exactly(tmp_path: str, use_buffers: bool) -> None:
    options = dict(decay=0.9, update_starting_at_step=2, use_buffers=use_buffers)
    lightning = fit_average(EMAWeightAveraging(**options), str(tmp_path))
    foreach = fit_average(callback := ForeachEMA(**options), str(tmp_path))
    average = callback._average_model
    assert average.avg_fn is None and average.multi_avg_fn is not None  # the foreach update ran, not Lightning's
    assert lightning.keys() == foreach.keys()
    for name, value in lightning.items():
        assert torch.equal(foreach[name], value), name
    trained = fit_average(ForeachEMA(decay=0.0, update_starting_at_step=2), str(tmp_path))
    assert not torch.equal(trained["layer.weight"], foreach["layer.weight"])  # the average is not the last weights


def test_runs_written_before_foreach_ema_still_resume() -> None:
    from lit_models.trusted_config import check_trusted

    # A run folder's config.yaml is an artifact: its old EMA target must stay buildable.
    check_trusted({"callbacks": {"ema": {"_target_": "lightning.pytorch.callbacks.EMAWeightAveraging", "decay": 0.99}}},
                  "runs/old/config.yaml")
    assert ForeachEMA(decay=0.99).state_key == EMAWeightAveraging(decay=0.99).state_key  # its callback state loads


def test_a_run_shorter_than_the_ema_start_keeps_its_trained_weights(tmp_path) -> None:
    # Lightning's average holds the initial weights until its first update and is swapped in
    # at validation, checkpoints and the end of fit regardless: 8 steps of training were lost.
    L.seed_everything(0, verbose=False)
    module = TinyRegression()
    initial = module.layer.weight.detach().clone()
    raw: dict[str, torch.Tensor] = {}

    class KeepRaw(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            raw.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    callback = ForeachEMA(decay=0.9, update_starting_at_step=100)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[KeepRaw(), callback], default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8))
    assert int(callback._average_model.n_averaged) == 0  # never updated
    assert not torch.equal(module.layer.weight, initial)
    for name, value in module.state_dict().items():
        assert torch.equal(value, raw[name]), name  # the trained weights, not the start's
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["layer.weight"], raw["layer.weight"])
