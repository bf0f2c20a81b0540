import os

# deterministic cuBLAS; must be set before the first CUDA call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from graph_api_stand_ins import stand_in_graph_api  # noqa: E402


def pytest_configure(config):
    rank = os.environ.get("LOCAL_RANK")
    if rank not in (None, "0"):
        # Lightning's DDP launcher starts each further rank by running the same command again
        pytest.exit(
            f"pytest was started again as local rank {rank}: a test fitted a Trainer on several devices in this "
            "process. Give that Trainer devices=1 (the DDP tests fit in processes of their own, tests/ddp_run.py).",
            returncode=3,
        )


@pytest.fixture(autouse=True)
def one_process():
    """A test that leaves a process group behind (a fit that started DDP in-process) is named."""
    yield
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized()), (
        "this test left a torch.distributed process group initialised (a Trainer on several devices?)"
    )


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_ddp = pytest.mark.skip(reason=f"needs two CUDA GPUs, found {gpus}")
    for item in items:
        if "cuda" in item.keywords and gpus == 0:
            item.add_marker(skip_cuda)
        if "ddp" in item.keywords and gpus < 2:
            item.add_marker(skip_ddp)


@pytest.fixture
def deterministic():
    """Seeded, TF32 off, deterministic kernels: eager and graphed runs must agree."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def graph_api_on_cpu(monkeypatch):
    """CUDA's graph API stood in for (see graph_api_stand_ins)."""
    stand_in_graph_api(monkeypatch)
