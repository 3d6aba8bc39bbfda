"""`--data.shard i/N`: independent jobs (a SLURM array, pre-emptible machines) each invert a
disjoint share into one run folder; every image once, a killed job rerun alone, one merge."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ph2p_lit.cli import main
from ph2p_lit.data import ImageDataModule
from ph2p_lit.runs import RunFolder, RunLock, read_jsonl

TESTS = Path(__file__).parent


def _args(tiny_model, image_folder, run_dir, shard):
    return ["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=2",
            "--model.max_iter=1", "--model.init_prompt=null", f"--data.root={image_folder}", "--data.batch_size=1",
            f"--data.shard={shard}", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={run_dir}"]


def test_shards_split_the_images_disjointly_and_stably():
    ids = [f"folder/img{i:05d}.png" for i in range(3000)]
    owners = []
    for image_id in ids:
        mine = [i for i in range(3) if ImageDataModule(files=["x"], shard=f"{i}/3").in_shard(image_id)]
        owners.append(mine)
    assert all(len(m) == 1 for m in owners)  # each image in exactly one share
    sizes = [sum(m == [i] for m in owners) for i in range(3)]
    assert all(900 < size < 1100 for size in sizes)  # about even
    assert owners[:5] == [[0], [1], [0], [0], [0]]  # the same split on every machine and run


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "a/b", "2"])
def test_a_bad_shard_is_one_line(shard):
    with pytest.raises(SystemExit, match="data.shard"):
        main(["invert", "--data.root=demo", f"--data.shard={shard}"])


def test_two_shard_jobs_one_killed_and_rerun_alone(tiny_model, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    # Shard 1 is killed mid-run (SIGKILL after its first optimiser step).
    env = {**os.environ, "PYTHONPATH": f"{TESTS}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "ph2p_lit.cli", *_args(tiny_model, image_folder, run, "1/2"),
                             "--trainer.callbacks+=kill_callback.KillAtStep", "--trainer.callbacks.step=1"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode != 0
    # Shard 0 runs while shard 1's job would still be running (its lock held): it keeps its own file.
    with RunLock(run, name="run.shard-1-of-2.lock"):
        main(_args(tiny_model, image_folder, run, "0/2"))
        assert "other shards are still running" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="a job is still writing"):
            main(["merge", str(run)])
    zero = read_jsonl(run / "prompts.shard-0-of-2.jsonl")
    # Shard 1 rerun alone: it does its images, then merges every shard into one prompts.jsonl.
    main(_args(tiny_model, image_folder, run, "1/2"))
    rows = read_jsonl(run / "prompts.jsonl")
    assert sorted(r["image_id"] for r in rows) == [f"img{i}.png" for i in range(4)]  # every image once
    assert not RunFolder(run).part_files("prompts")
    assert {r["image_id"]: r["token_ids"] for r in zero}.items() <= {r["image_id"]: r["token_ids"] for r in rows}.items()
    shard_of = {i: ImageDataModule(files=["x"], shard="0/2").in_shard(f"img{i}.png") for i in range(4)}
    assert {r["image_id"] for r in zero} == {f"img{i}.png" for i, first in shard_of.items() if first}
    main(["merge", str(run)])
    assert "nothing to merge" in capsys.readouterr().out
