"""Data-parallel runs (sae_unlearn.distributed): two gloo processes on the CPU give what one process gives
on the same global batch: feature statistics, CRISP (both objectives) and NPO adapters, RMU weights and
trained TopK SAEs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_unlearn.distributed import World

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, world_size: int, cache: Path) -> list[subprocess.Popen[bytes]]:
    """What `accelerate launch --cpu --num_processes N` sets up, without its CLI's start-up time."""
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "SAE_UNLEARN_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
        "ACCELERATE_USE_CPU": "true",
    }
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(key, None)
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = dict(base)
        if world_size > 1:
            env.update(
                WORLD_SIZE=str(world_size),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.distributed_worker", str(out)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    procs = _launch(one, 1, tmp_path / "cache1") + _launch(two, 2, tmp_path / "cache2")
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output.decode()[-4000:]
    assert (two / "rank1").is_dir() and not (one / "rank1").exists()  # two ranks did run
    single, parallel = load_file(str(one / "result.safetensors")), load_file(str(two / "result.safetensors"))
    assert single.keys() == parallel.keys()
    assert any(k.startswith("crisp.") for k in single) and any(k.startswith("rmu.") for k in single)
    for key, value in single.items():
        if key.endswith((".tokens", "_count", ".steps", ".since_fired")):
            assert torch.equal(value, parallel[key]), key
        else:
            torch.testing.assert_close(parallel[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert int(single["sae.steps"][0]) > 3  # several SAE steps
    # training moved the adapters (the comparison is not between two untouched initialisations)
    assert any(k.startswith("crisp.") and "lora_B" in k and value.abs().max() > 0 for k, value in single.items())


def test_world_of_one_is_the_identity() -> None:
    ranks = World()
    assert (ranks.size, ranks.rank, ranks.is_main, ranks.active) == (1, 0, True, False)
    assert ranks.bounds(5) == (0, 5) and ranks.shard([1, 2, 3]) == [1, 2, 3]
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(ranks.sum(x), x) and torch.equal(ranks.max(x), x)
    assert float(ranks.global_count(0)) == 1.0


@pytest.mark.parametrize(("n", "size"), [(4, 2), (5, 2), (7, 3), (2, 2)])
def test_shards_cover_the_batch_in_order(n: int, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = []
    for rank in range(size):
        ranks = World()
        monkeypatch.setattr(World, "size", property(lambda self, s=size: s))
        monkeypatch.setattr(World, "rank", property(lambda self, r=rank: r))
        parts.append(ranks.shard(list(range(n))))
    assert [x for part in parts for x in part] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_processes_option_relaunches_under_accelerate(tmp_path: Path) -> None:
    """`sae-unlearn --processes 2 features ...` runs two ranks through accelerate launch (gloo here)."""
    from tests.conftest import make_tokenizer, tiny_model, tiny_sae, write_pack

    tokenizer = make_tokenizer()
    tiny_model("llama", len(tokenizer)).save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    for layer in (1, 2):
        tiny_sae(layer, seed=layer).save_model(str(tmp_path / "saes" / f"blocks.{layer}.hook_resid_post"))
    write_pack(tmp_path / "pack")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SAE_UNLEARN_CACHE": str(tmp_path / "c")}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env["MASTER_PORT"] = str(_free_port())
    command = [sys.executable, "-m", "sae_unlearn.cli", "--processes", "2", "features", "--device", "cpu"]
    command += ["--model", str(tmp_path / "model"), "--sae", str(tmp_path / "saes"), "--concept"]
    command += [str(tmp_path / "pack"), "--out", str(tmp_path / "out"), "--k", "4", "--set", "min_ratio=0"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel: 2 processes" in done.stderr
    assert (tmp_path / "out" / "features.json").exists()
    assert done.stdout.count("wrote") == 1  # the other rank prints nothing
