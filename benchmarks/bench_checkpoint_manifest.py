#!/usr/bin/env python
"""What the checkpoint manifest (megagpt/checkpoint_dir.py) adds to a save, and what verifying costs at resume.

Writes a checkpoint shaped like one rank of ``--config`` (default configs/gpt127.json: bf16 ZeRO-1 AdamW8bit):
``mp_rank_00_model_states.pt`` with the bf16 weights and ``zero_pp_rank_0_mp_rank_00_optim_states.pt`` with the
fp32 master copy and two 8-bit moments, through ``torch.save`` as DeepSpeed does, and the same files as a save
writes them now (hashed while written, ``torch_save_hashed``, then ``write_manifest``), alternating, ``--repeats``
times; also a manifest read back after a plain save and ``checkpoint_problems`` (what a resume adds). Reports
medians and the ratio hashed save / plain save. CPU figures on this machine's disk; a GPU node's disk and cores differ.
    python benchmarks/bench_checkpoint_manifest.py --output benchmarks/results/checkpoint_manifest.json
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_preprocess import write_json  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from megagpt.checkpoint_dir import (checkpoint_problems, torch_save_hashed, write_hashes_part,  # noqa: E402
                                    write_manifest)
from megagpt.config import load_config, parameter_count  # noqa: E402


def fake_checkpoint(n_params: int) -> tuple[dict, dict]:
    """(model states, optimizer shard) with the sizes of a bf16 ZeRO-1 AdamW8bit rank holding ``n_params``."""
    generator = torch.Generator().manual_seed(0)
    master = torch.randn(n_params, generator=generator)
    model = {"module": {"flat.weight": master.to(torch.bfloat16)}}
    optim = {"optimizer_state_dict": {"master": master,
                                      "state1": torch.randint(0, 255, (n_params,), dtype=torch.uint8),
                                      "state2": torch.randint(0, 255, (n_params,), dtype=torch.uint8),
                                      "absmax": torch.rand(n_params // 256 + 1)}}
    return model, optim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "gpt127.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--output", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    n_params = parameter_count(load_config(args.config, ["data.data_path=[\"unused\"]"]).model)
    model, optim = fake_checkpoint(n_params)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-manifest-"))
    files = {"mp_rank_00_model_states.pt": model, "zero_pp_rank_0_mp_rank_00_optim_states.pt": optim}
    times = {"save_s": [], "hashed_save_s": [], "read_back_manifest_s": [], "verify_s": []}

    def timed(key, work):
        start = time.perf_counter()
        work()
        times[key].append(time.perf_counter() - start)

    def hashed_save(step_dir):  # what a save does now: hash while writing, then merge into the manifest
        hashes = {}
        for name, obj in files.items():
            torch_save_hashed(obj, step_dir / name, hashes)
        write_hashes_part(step_dir, 0, hashes)
        write_manifest(step_dir)

    try:
        for repeat in range(args.repeats):  # plain save, hashed save, read-back manifest, verify: same run
            plain, hashed = root / f"plain{repeat}", root / f"hashed{repeat}"
            plain.mkdir(), hashed.mkdir()
            timed("save_s", lambda: [torch.save(obj, plain / name) for name, obj in files.items()])
            timed("hashed_save_s", lambda: hashed_save(hashed))
            timed("read_back_manifest_s", lambda: write_manifest(plain))
            timed("verify_s", lambda: checkpoint_problems(hashed))
            assert checkpoint_problems(hashed) == [] and checkpoint_problems(plain) == []
            size = sum(p.stat().st_size for p in plain.iterdir() if p.name != "manifest.json")
            shutil.rmtree(plain), shutil.rmtree(hashed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"config": args.config, "parameters": n_params, "checkpoint_bytes": size, "repeats": args.repeats,
              **{key: statistics.median(values) for key, values in times.items()},
              "cpu_count": os.cpu_count(), "machine": platform.node(),
              "note": "CPU and local disk (page cache) of this machine; not a GPU node's figures"}
    result["hashed_save_over_save"] = result["hashed_save_s"] / result["save_s"]
    print(f"{n_params:,} parameters, {size / 2**30:.2f} GiB checkpoint (medians of {args.repeats}): save "
          f"{result['save_s']:.2f} s, save hashing as it writes + manifest {result['hashed_save_s']:.2f} s "
          f"(x{result['hashed_save_over_save']:.3f}); a manifest read back after a plain save "
          f"{result['read_back_manifest_s']:.2f} s; verify {result['verify_s']:.2f} s")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
