import os
import sys

# the fused attention kernel (Triton) runs on CPU under Triton's interpreter; read when Triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gpu_code_paths(monkeypatch):
    """The code an H100 runs, on CPU: attention and fp32 GEMMs take their GPU paths, with CPU stand-ins for
    cuBLAS's bf16 x bf16 -> fp32 GEMMs (CPU has no ``out_dtype``), and experts use ``torch._grouped_mm``."""
    from titan_dsv4.models.deepseek_v4 import attention, fp32_linear, head_loss
    from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

    for module in (attention, fp32_linear):
        monkeypatch.setattr(module, "takes_gpu_path", lambda x: True)
    for module in (fp32_linear, head_loss):
        monkeypatch.setattr(module, "bf16_mm", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(fp32_linear, "bf16_bmm", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", True)
