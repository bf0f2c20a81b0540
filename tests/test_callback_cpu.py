"""The callback on a machine (or a model) without CUDA: one warning, training untouched."""

import re
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch

import models
from lightning_graphs import CUDAGraphCallback, GraphedStep, GraphWarning
from lightning_graphs.graphed_step import Phase
from parity import MemoryLogger, Recorder, loader


def _fit_on_cpu(callbacks, seed=0):
    pl.seed_everything(seed, verbose=False)
    module = models.Regressor("adamw", "lambda")
    recorder, logger = Recorder(), MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, *callbacks],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=loader())
    graph_warnings = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    return module, recorder, logger, trainer, graph_warnings


def test_on_cpu_the_callback_warns_once_and_changes_nothing():
    eager_module, eager_rec, eager_log, _, _ = _fit_on_cpu([])
    callback = CUDAGraphCallback()
    module, rec, log, trainer, graph_warnings = _fit_on_cpu([callback])
    assert len(graph_warnings) == 1 and "CUDA" in graph_warnings[0]
    assert rec.losses == eager_rec.losses
    assert rec.lrs == eager_rec.lrs
    assert log.records == eager_log.records
    for (name, a), b in zip(module.state_dict().items(), eager_module.state_dict().values()):
        assert torch.equal(a, b), name
    assert "run" not in trainer.fit_loop.epoch_loop.automatic_optimization.__dict__
    assert callback.stats is None


def test_warning_is_given_again_in_a_second_fit():
    callback = CUDAGraphCallback()
    _, _, _, _, first = _fit_on_cpu([callback])
    _, _, _, _, second = _fit_on_cpu([callback])
    assert len(first) == len(second) == 1


def test_negative_warmup_is_rejected():
    with pytest.raises(ValueError, match="warmup_steps"):
        CUDAGraphCallback(warmup_steps=-1)


def test_max_graphs_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphCallback(max_graphs=0)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedStep(lambda: None, max_graphs=0)



@pytest.mark.parametrize("kwargs, error, needle", [
    ({"warmup_steps": 2.5}, TypeError, "`warmup_steps` must be a whole number"),
    ({"max_graphs": True}, TypeError, "`max_graphs` must be a whole number"),
    ({"graph_evaluation": "yes"}, TypeError, "`graph_evaluation` must be True or False"),
    ({"compile": "max-autotune"}, TypeError, "a dict of torch.compile arguments"),
    ({"compile": {"mode": "reduce-overhead"}}, ValueError, "CUDA graphs of its own"),
])
def test_callback_arguments_of_the_wrong_kind_are_named(kwargs, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        CUDAGraphCallback(**kwargs)


def test_graphed_step_arguments_of_the_wrong_kind_are_named():
    with pytest.raises(TypeError, match="`fn` must be the step function"):
        GraphedStep(42)
    with pytest.raises(ValueError, match="`device` must name a CUDA device"):
        GraphedStep(lambda: None, device="gpu")
    with pytest.raises(ValueError, match="`device` must name a CUDA device"):
        GraphedStep(lambda: None, device="cpu")
    with pytest.raises(TypeError, match=re.escape("`modules` must be a list, got int: pass [module]")):
        GraphedStep(lambda: None, modules=3)
    with pytest.raises(TypeError, match=re.escape('`watch` takes (label, object) pairs, e.g. `watch=[("sim", sim)]`')):
        GraphedStep(lambda: None, watch=[torch.nn.Linear(2, 1)])
    with pytest.raises(TypeError, match=re.escape("`follow` takes (label, object) pairs")):
        GraphedStep(lambda: None, follow=("data", object()))
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=re.escape("got a Parameter: pass `optimizers=[optimizer]` (the optimizer, not")):
        GraphedStep(lambda: None, optimizers=model.parameters())
    with pytest.raises(TypeError, match="`optimizers` takes torch.optim.Optimizer objects, got a Linear"):
        GraphedStep(lambda: None, optimizers=[model])
    with pytest.raises(TypeError, match="`modules` takes torch.nn.Module objects, got a SGD"):
        GraphedStep(lambda: None, modules=[torch.optim.SGD(model.parameters(), lr=0.1)])


def test_one_optimizer_or_module_alone_is_taken_as_a_list_of_it():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = GraphedStep(lambda: None, optimizers=optimizer, modules=model)
    assert [o.optimizer for o in step._optimizers] == [optimizer] and step._modules == [model]


def test_stats_as_metrics_are_numbers_under_one_prefix():
    from lightning_graphs import GraphStats

    stats = GraphStats(captures=2, replays=90, graph_memory_bytes=3 * 2**20, evictions=1)
    metrics = stats.as_metrics()
    assert metrics["cuda_graphs/replays"] == 90.0 and metrics["cuda_graphs/graph_memory_mib"] == 3.0
    assert metrics["cuda_graphs/disabled"] == 0.0
    assert all(key.startswith("cuda_graphs/") and isinstance(v, float) for key, v in metrics.items())
    assert "1 evicted" in stats.summary()


def test_graphed_step_without_cuda_runs_eagerly_with_one_warning():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = GraphedStep(step, optimizers=[opt], modules=[model])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [graphed(torch.ones(4, 3)) for _ in range(5)]
    messages = [str(w.message) for w in caught if issubclass(w.category, GraphWarning)]
    assert len(messages) == 1 and "CUDA" in messages[0]
    assert graphed.phase is Phase.DISABLED
    assert graphed.stats.eager_steps == 5 and graphed.stats.replays == 0
    assert losses[0] > losses[-1]  # it trained


def test_unsupported_optimizer_is_reported_at_construction():
    model = torch.nn.Linear(3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = GraphedStep(lambda x: x, optimizers=[torch.optim.LBFGS(model.parameters())])
    assert graphed.phase is Phase.DISABLED
    assert any("LBFGS" in str(w.message) for w in caught)


def test_the_core_does_not_import_lightning():
    code = "import lightning_graphs, sys; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stats_summary_reads_well():
    graphed = GraphedStep(lambda x: x)
    graphed.stats.captures, graphed.stats.replays, graphed.stats.eager_steps = 1, 90, 2
    graphed.stats.eager_reasons["batch[0] has shape (3, 8)"] = 2
    text = graphed.stats.summary()
    assert "1 capture" in text and "90 replays" in text and "2 x batch[0] has shape (3, 8)" in text


def test_numpy_counts_and_flags_and_a_mapping_for_compile_are_taken():
    np = pytest.importorskip("numpy")
    from types import MappingProxyType

    callback = CUDAGraphCallback(warmup_steps=np.int64(2), graph_evaluation=np.True_,
                                 compile=MappingProxyType({"dynamic": False}))
    assert callback.warmup_steps == 2 and callback.graph_evaluation is True and callback.compile == {"dynamic": False}


def test_the_closure_view_of_a_step_can_be_copied():
    import copy

    from lightning_graphs.python_state import what_fn_reads

    dt = 0.1

    def step():
        return dt

    ((_, variables),) = what_fn_reads(step)
    assert copy.copy(variables).__dict__ == {"dt": 0.1}
