"""Every example runs at a tiny size; on a GPU, its graphed run agrees with its eager one."""

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
cuda = pytest.mark.cuda


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quietly(main, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def test_physics_rollout_learns_and_both_runs_agree():
    result = _quietly(_example("physics_rollout").main, ["--steps", "30", "--tiny"])
    losses = result["eager_losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert result["graph_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-9)
    assert result["parameter_difference"] < 1e-5


def test_pinn_trains_towards_the_exact_solution():
    result = _quietly(_example("pinn").main, ["--steps", "60", "--points", "64", "--no-eager"])
    assert len(result["losses"]) == 60
    assert sum(result["losses"][-10:]) < sum(result["losses"][:10])
    assert 0 < result["relative_error"] < 1.5


def test_pinn_residual_is_zero_for_the_exact_solution():
    pinn = _example("pinn")

    class Exact(torch.nn.Module):
        def forward(self, points):
            return pinn.exact(points[:, :1], points[:, 1:])

    generator = torch.Generator().manual_seed(0)
    points = pinn.collocation_points(generator, 256, torch.device("cpu"))
    assert pinn.pde_loss(Exact(), *points).item() < 1e-6
    assert pinn.relative_error(Exact(), torch.device("cpu")) < 1e-6


def test_simulation_loop_runs_and_conserves_energy_when_stable():
    sim = _example("simulation_loop")
    result = _quietly(sim.main, ["--grid", "32", "--steps", "100", "--every", "10"])
    eager = result.get("graphed", result["eager"])
    assert eager["steps"] == 100 and not eager["stopped_early"]
    current, previous = sim.initial_field(32, torch.device("cpu"))
    start = float(sim.energy(current, previous))
    sim.advance(current, previous, 100)
    assert float(sim.energy(current, previous)) == pytest.approx(start, rel=0.2)


def test_fabric_loop_runs():
    result = _quietly(_example("fabric_loop").main, ["--steps", "12"])
    assert len(result["losses"]) == 12 and all(math.isfinite(x) for x in result["losses"])


@cuda
def test_physics_rollout_graphed_matches_eager_on_gpu(deterministic):
    result = _example("physics_rollout").main(["--steps", "60"])
    assert result["graph_losses"] == pytest.approx(result["eager_losses"], rel=1e-5, abs=1e-8)
    assert result["parameter_difference"] < 1e-5


@cuda
def test_pinn_graphed_matches_eager_on_gpu(deterministic):
    pinn = _example("pinn")
    device = torch.device("cuda")
    graphed, graphed_losses, _ = pinn.train(80, 256, graphed=True, device=device)
    eager, eager_losses, _ = pinn.train(80, 256, graphed=False, device=device)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-7)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda
def test_simulation_loop_graphed_trajectory_equals_eager_exactly():
    result = _example("simulation_loop").main(["--grid", "64", "--steps", "200", "--every", "20"])
    assert result["difference"] == 0.0
    assert result["graphed"]["steps"] == result["eager"]["steps"] == 200
    assert "1 capture" in result["graphed"]["summary"]


@cuda
def test_simulation_loop_stops_outside_the_graph_on_a_blow_up():
    sim = _example("simulation_loop")
    sim.COURANT = 0.9  # unstable: the energy grows without bound
    try:
        result = sim.simulate(64, 2000, 20, True, torch.device("cuda"), limit=10.0)
    finally:
        sim.COURANT = 0.5
    assert result["stopped_early"] and result["steps"] < 2000
