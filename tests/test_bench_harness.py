"""The benchmark harness at tiny size, on whatever device is here (no timing asserts)."""

import json
import sys

import torch

from benchmarks import bench
from benchmarks.workloads import WORKLOADS, WorkloadModule, loader, rollout_positions


def test_every_workload_trains_one_step_at_tiny_size():
    for name, make in WORKLOADS.items():
        workload = make(tiny=True)
        model = workload.make_model()
        batch = workload.batches(count=1, pin=False)[0]
        loss = workload.loss(model, batch)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert all(p.grad is not None for p in model.parameters()), name


def test_rollout_integrates_semi_implicitly():
    class Zero(torch.nn.Module):
        def forward(self, state):
            return torch.zeros(*state.shape[:-1], 2)

    state = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    pos = rollout_positions(Zero(), state, steps=1, dt=0.1)
    # acc = -0.1 * pos; v = 0 + 0.1 * (-0.1); p = 1 + 0.1 * v
    assert torch.allclose(pos, torch.tensor([[1.0 - 0.001, 0.0]]))


def test_loader_cycles_the_batches():
    workload = WORKLOADS["mlp"](tiny=True)
    items = list(loader(workload, 10, pin=False))
    assert len(items) == 10
    assert torch.equal(items[0][0], items[8][0])


def test_workload_module_logs_its_loss():
    module = WorkloadModule(WORKLOADS["mlp"](tiny=True))
    assert isinstance(module.configure_optimizers(), torch.optim.AdamW)


def test_harness_end_to_end_tiny(tmp_path, capsys):
    code = bench.main(["--tiny", "--workloads", "mlp", "--modes", "raw-eager", "lightning-eager", "lightning-graphs",
                       "--steps", "3", "--warmup", "2", "--repeats", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads((tmp_path / "results.json").read_text())
    modes = {r["mode"] for r in record["results"]}
    assert modes == {"raw-eager", "lightning-eager", "lightning-graphs"}
    assert all(len(r["steps_per_s"]) == 3 for r in record["results"])
    assert "torch" in record["environment"] and record["command"].startswith("python benchmarks/bench.py")
    assert "steps/s" in out
    assert bench.main(["--replot", str(tmp_path / "results.json"), "--out", str(tmp_path / "again"),
                       "--modes", "raw-eager", "lightning-graphs"]) in (0, 1)  # 1: no matplotlib here
    assert "lightning-graphs" in capsys.readouterr().out


def test_replot_merges_runs_of_different_workloads(tmp_path, capsys):
    for workload in ("mlp", "rollout"):
        code = bench.main(["--tiny", "--workloads", workload, "--modes", "raw-eager", "lightning-graphs",
                           "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path / workload)])
        assert code == 0
    bench.main(["--replot", str(tmp_path / "mlp" / "results.json"), str(tmp_path / "rollout" / "results.json"),
                "--out", str(tmp_path / "merged"), "--modes", "raw-eager", "lightning-graphs"])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert {r["workload"] for r in merged["results"]} == {"mlp", "rollout"}
    assert len(merged["runs"]) == 2 and set(merged["ratios"]) == {"mlp", "rollout"}
    out = capsys.readouterr().out
    assert "lightning-graphs on mlp" in out and "lightning-graphs on rollout" in out


def test_kernel_comparison_orders_by_time_difference():
    from benchmarks.compare_graphs import compare

    ours = {"gemm": (10.0, 100.0), "adam_scalar": (8.0, 20.0), "copy": (1.0, 2.0)}
    theirs = {"gemm": (10.0, 99.0), "lerp": (1.0, 5.0)}
    rows = compare(ours, theirs)
    assert [row[0] for row in rows] == ["adam_scalar", "lerp", "copy", "gemm"]
    assert rows[1] == ("lerp", 0.0, 1.0, 0.0, 5.0)


def test_graph_topology_counts_nodes_by_kind_and_edges():
    from benchmarks.compare_graphs import graph_shape

    dot = """digraph dot {
subgraph cluster_1 {
label="graph_1" graph[style="dashed"];
"graph_1_node_0"[style="solid" shape="rectangle" label="0\nKERNEL\nvoid gemm(...)\n"];
"graph_1_node_1"[style="solid" shape="record" label="{
MEMSET
| {{ID | node handle} | {1 | 0x1}}
}"];
"graph_1_node_2"[style="solid" shape="rectangle" label="2\nKERNEL\nvoid add(...)\n"];
"graph_1_node_3"[style="solid" shape="rectangle" label="3\nEVENT_RECORD\n"];
"graph_1_node_0" -> "graph_1_node_1";
"graph_1_node_1" -> "graph_1_node_2";
"graph_1_node_2" -> "graph_1_node_3";
}
}"""
    assert graph_shape(dot) == {"KERNEL": 2, "MEMSET": 1, "EVENT_RECORD": 1, "edges": 3}


def test_rounds_take_the_modes_in_turn_and_report_the_median_of_their_medians(tmp_path, capsys):
    code = bench.main(["--tiny", "--workloads", "mlp", "--modes", "raw-eager", "lightning-eager", "--rounds", "3",
                       "--steps", "2", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    order = [line.split("] ")[1].split(" (round")[0] for line in out.splitlines() if line.startswith("[")]
    assert order == ["mlp / raw-eager", "mlp / lightning-eager"] * 3
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["settings"]["rounds"] == 3
    for result in record["results"]:
        assert len(result["process_medians"]) == 3 and len(result["steps_per_s"]) == 6
        assert result["median_steps_per_s"] == sorted(result["process_medians"])[1]


def test_one_failed_round_reports_the_failure():
    good = {"median_steps_per_s": 10.0, "steps_per_s": [10.0], "peak_memory_mib": None}
    failed = {"workload": "mlp", "mode": "raw-eager", "error": "boom"}
    assert bench.merge_rounds([good, failed]) is failed
