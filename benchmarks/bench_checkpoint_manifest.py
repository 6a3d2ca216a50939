#!/usr/bin/env python
"""What the checkpoint manifest (megagpt/checkpoint_dir.py) adds to a save, and what verifying costs at resume.

Writes a checkpoint shaped like one rank of ``--config`` (default configs/gpt127.json: bf16 ZeRO-1 AdamW8bit):
``mp_rank_00_model_states.pt`` with the bf16 weights and ``zero_pp_rank_0_mp_rank_00_optim_states.pt`` with the
fp32 master copy and two 8-bit moments, through ``torch.save`` as DeepSpeed does; then times ``write_manifest``
(what each save adds) and ``checkpoint_problems`` (what a resume adds) on the same files, ``--repeats`` times,
and reports medians and the ratio manifest / save. The files are read back right after being written (page cache),
as in a real save. CPU figures on this machine's disk; a GPU node's disk and cores differ.
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
from megagpt.checkpoint_dir import checkpoint_problems, write_manifest  # noqa: E402
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
    save_s, manifest_s, verify_s = [], [], []
    try:
        for repeat in range(args.repeats):
            step_dir = root / f"step{repeat}"
            step_dir.mkdir()
            start = time.perf_counter()
            torch.save(model, step_dir / "mp_rank_00_model_states.pt")
            torch.save(optim, step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            write_manifest(step_dir)
            manifest_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert checkpoint_problems(step_dir) == []
            verify_s.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in step_dir.iterdir())
            shutil.rmtree(step_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"config": args.config, "parameters": n_params, "checkpoint_bytes": size, "repeats": args.repeats,
              "save_s": statistics.median(save_s), "manifest_s": statistics.median(manifest_s),
              "verify_s": statistics.median(verify_s), "cpu_count": os.cpu_count(), "machine": platform.node(),
              "note": "CPU and local disk of this machine; not a GPU node's figures"}
    result["manifest_over_save"] = result["manifest_s"] / result["save_s"]
    print(f"{n_params:,} parameters, {size / 2**30:.2f} GiB checkpoint: save {result['save_s']:.2f} s, manifest "
          f"{result['manifest_s']:.2f} s (x{result['manifest_over_save']:.3f} of the save), verify "
          f"{result['verify_s']:.2f} s (medians of {args.repeats})")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
