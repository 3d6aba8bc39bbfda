"""More than one machine: two "nodes" launched by torchrun on this machine (one process each,
gloo, the rendezvous on 127.0.0.1), as a cluster launches them."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ph2p_lit.runs import read_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = Path(__file__).parent.parent / "scripts" / "torchrun_invert.sh"


@pytest.mark.slow
def test_two_nodes_by_torchrun_invert_every_image_once(tiny_model, image_folder, tmp_path):
    """Each image once, in one prompts.jsonl (that two ranks give one process's prompts is
    tests/test_cli.py::test_two_process_ddp_gives_the_prompts_of_one_process)."""
    # The README's script, as each machine runs it; torchrun and python from this environment.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    options = [f"--model.model={tiny_model}", "--model.prompt_length=3", "--model.steps=2", "--model.max_iter=1",
               "--model.refinement=null", "--data.batch_size=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
               "--trainer.callbacks=[]"]
    nodes = [subprocess.Popen(["bash", str(SCRIPT), "demo", image_folder, str(tmp_path / "two"), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-2000:] + logs[1][-2000:]
    assert "GLOBAL_RANK: 1" in logs[1]  # the second node really joined

    two = read_jsonl(tmp_path / "two" / "prompts.jsonl")
    assert sorted(r["image_id"] for r in two) == [f"img{i}.png" for i in range(4)]  # each image once
    assert not list((tmp_path / "two").glob("prompts.rank*.jsonl"))  # merged into one file
    assert all(len(r["token_ids"]) == 3 and r["steps"] == 2 for r in two)
