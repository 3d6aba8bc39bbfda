"""More than one machine: two "nodes" launched by torchrun on this machine (one process each,
gloo, the rendezvous on 127.0.0.1), as a cluster launches them."""

import os
import socket
import subprocess
import sys

import pytest

from ph2p_lit.runs import read_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _invert(tiny_model, image_folder, run_dir, extra=()):
    return [sys.executable, "-m", "ph2p_lit.cli", "invert", f"--model.model={tiny_model}",
            "--model.prompt_length=3", "--model.steps=2", "--model.max_iter=1", "--model.lr=20",
            f"--data.root={image_folder}", "--data.batch_size=1", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={run_dir}", *extra]


@pytest.mark.slow
def test_two_nodes_by_torchrun_invert_every_image_once(tiny_model, image_folder, tmp_path):
    """Each image once, in one prompts.jsonl (that two ranks give one process's prompts is
    tests/test_cli.py::test_two_process_ddp_gives_the_prompts_of_one_process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
         *_invert(tiny_model, image_folder, tmp_path / "two",
                  ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"])[2:]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-2000:] + logs[1][-2000:]
    assert "GLOBAL_RANK: 1" in logs[1]  # the second node really joined

    two = read_jsonl(tmp_path / "two" / "prompts.jsonl")
    assert sorted(r["image_id"] for r in two) == [f"img{i}.png" for i in range(4)]  # each image once
    assert not list((tmp_path / "two").glob("prompts.rank*.jsonl"))  # merged into one file
    assert all(len(r["token_ids"]) == 3 and r["steps"] == 2 for r in two)
