"""Which strategies are graphed, and when batches are alike on every rank (no GPU, no launch)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_graphs import CUDAGraphCallback
from lightning_graphs import _lightning as internals


def _trainer(strategy, world_size=2):
    return SimpleNamespace(strategy=strategy, world_size=world_size)


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp_strategy(**ddp_kwargs):
    strategy = DDPStrategy(parallel_devices=[torch.device("cuda", 0)])
    strategy.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1), **ddp_kwargs)
    return strategy


def test_one_device_is_graphed_and_sharded_strategies_are_not():
    assert internals.strategy_unsupported(_trainer(SingleDeviceStrategy("cpu"), world_size=1)) is None
    reason = internals.strategy_unsupported(_trainer(FSDPStrategy()))
    assert "FSDPStrategy strategy is not graphed yet" in reason and 'strategy="ddp"' in reason
    assert "DDPStrategy" in internals.strategy_unsupported(_trainer(DDPStrategy()))  # no DDP module (yet)


def test_ddp_is_graphed_unless_it_looks_for_unused_parameters_or_has_a_communication_hook(one_rank_group):
    assert internals.strategy_unsupported(_trainer(_ddp_strategy())) is None
    assert internals.strategy_unsupported(_trainer(_ddp_strategy(static_graph=True))) is None
    assert "find_unused_parameters" in internals.strategy_unsupported(
        _trainer(_ddp_strategy(find_unused_parameters=True))
    )
    hooked = _ddp_strategy()
    hooked._ddp_comm_hook = lambda state, bucket: None
    assert "communication hook" in internals.strategy_unsupported(_trainer(hooked))


def test_rank_agreement_arguments_are_checked():
    with pytest.raises(ValueError, match="`rank_agreement` must be one of"):
        CUDAGraphCallback(rank_agreement="sometimes")
    with pytest.raises(ValueError, match="`agreement_timeout` must be positive, got 0"):
        CUDAGraphCallback(agreement_timeout=0)


def test_manual_optimization_under_ddp_trains_eagerly_and_says_why(one_rank_group):
    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    for world_size in (2, 1):  # DDP on one device too: its reducer runs in every backward
        trainer = SimpleNamespace(strategy=_ddp_strategy(), world_size=world_size, precision="32-true")
        reason = CUDAGraphCallback()._unsupported(trainer, Manual())
        assert reason == "manual optimization is not graphed under the DDPStrategy strategy yet"
    automatic = Manual()
    automatic.automatic_optimization = True
    assert CUDAGraphCallback()._unsupported(trainer, automatic) is None


def test_the_sigterm_check_asks_the_given_agreement_and_stops_as_lightning_does():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    epoch_loop = SimpleNamespace()
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=epoch_loop), received_sigterm=False)
    asked = []

    def rank_zero_flag(flag):
        asked.append(flag)
        return flag

    internals.patch_sigterm_broadcast(trainer, rank_zero_flag)
    epoch_loop._broadcast_sigterm_tensor()  # nothing received: training goes on
    trainer.received_sigterm = True
    with pytest.raises(SIGTERMException):
        epoch_loop._broadcast_sigterm_tensor()
    assert asked == [False, True]
    internals.unpatch_sigterm_broadcast(trainer)
    internals.unpatch_sigterm_broadcast(trainer)  # twice is fine
    assert not hasattr(epoch_loop, "_broadcast_sigterm_tensor")
