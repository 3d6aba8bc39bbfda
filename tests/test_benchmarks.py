"""The GPU benchmark script runs the same code at toy size on the CPU, so it cannot rot unseen."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402


def test_one_evaluation_gives_the_prompt_a_gradient():
    backbone = gpu.build("tiny", torch.float32, "cpu")
    prompt = torch.zeros(2, backbone.max_length, backbone.token_table.shape[1], requires_grad=True)
    latents = torch.randn(2, *backbone.latent_shape)
    gpu.evaluation(backbone, prompt, latents, torch.tensor([500, 800]), torch.randn_like(latents))
    assert prompt.grad is not None and prompt.grad[:, 1:].abs().sum(dim=(1, 2)).gt(0).all()


def test_gpu_benchmark_table_at_toy_size():
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--size", "tiny", "--device", "cpu", "--batches", "1", "2",
         "--dtypes", "float32", "--repeats", "1", "--steps", "10", "--max-iter", "2"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| float32")]
    assert [int(r[1]) for r in rows] == [1, 2]  # a row per batch size, each with all eight columns filled
    assert all(len(r) == 8 and all(c.strip() for c in r) for r in rows)

def test_bookkeeping_benchmark_table_at_toy_size(tmp_path, capsys, monkeypatch):
    import bookkeeping

    monkeypatch.setattr(sys, "argv", ["bookkeeping.py", "--sizes", "30", "60", "--folder", str(tmp_path)])
    bookkeeping.main()
    table = capsys.readouterr().out.splitlines()
    stages = [line for line in table if line.startswith(("list the folder", "merge shard", "total"))]
    assert len(stages) == 3 and all(line.count(" s") >= 2 for line in stages)  # a time for each size
