#!/usr/bin/env python
"""Preprocessing throughput: megagpt's ``preprocess()`` beside a plain single-process baseline, on CPU.

For each corpus (gcide.jsonl.zst from ../shared/data, and a generated unicode-heavy corpus where ftfy dominates):
  baseline   one process, per document: json.loads, ftfy.fix_text (or not), Hugging Face ``tokenizers`` GPT-2 BPE
             from the same vocab.json/merges.txt, append EOD, collect into a numpy array, write a .bin
  megagpt    ``preprocess()`` in-process with 1 and 2 workers (``--workers``), ftfy on and off, EOD appended
MB/s is decompressed input bytes / wall seconds of the whole run (tokenizer loading and pool start-up included);
tokens/s likewise. The .bin files of every configuration with the same ftfy setting must be byte-identical (the
baseline is a check on megagpt's output, not only a clock); the run reports it and exits 2 if not. Example:
    python benchmarks/bench_preprocess.py --corpus both --repeat 3 --tag my-machine
    python benchmarks/bench_preprocess.py --max-mb 2      # a quick check that it runs
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__:  # python -m benchmarks.bench_preprocess
    from .unicode_corpus import write_unicode_corpus
else:  # python benchmarks/bench_preprocess.py: this folder is sys.path[0]
    from unicode_corpus import write_unicode_corpus

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEGAGPT_SHARED_DATA", REPO.parent / "shared" / "data"))
EOD = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["gcide", "unicode", "both"], default="both")
    p.add_argument("--gcide", default=str(SHARED_DATA / "gcide.jsonl.zst"), help="path of gcide.jsonl.zst")
    p.add_argument("--vocab-file", default=str(SHARED_DATA / "gpt2" / "vocab.json"))
    p.add_argument("--merge-file", default=str(SHARED_DATA / "gpt2" / "merges.txt"))
    p.add_argument("--unicode-mb", type=float, default=16.0, help="size of the generated unicode corpus (MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the unicode corpus")
    p.add_argument("--max-mb", type=float, default=None,
                   help="use only the first MB (10^6 bytes, decompressed, whole lines) of each corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="megagpt worker counts to run")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (interleaved); the median counts")
    p.add_argument("--tag", default=socket.gethostname(), help="names the default --output")
    p.add_argument("--output", default=None, help="JSON results (default benchmarks/results/preprocess_<tag>.json)")
    p.add_argument("--tmp-dir", default=None, help="where corpora cuts and outputs go (default: system temp)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.max_mb is not None and args.max_mb <= 0:
        p.error(f"--max-mb must be positive, got {args.max_mb}")
    if args.unicode_mb <= 0:
        p.error(f"--unicode-mb must be positive, got {args.unicode_mb}")
    if not args.workers or min(args.workers) < 1:
        p.error(f"--workers must be counts >= 1, got {args.workers}")
    if args.output is None:
        args.output = str(REPO / "benchmarks" / "results" / f"preprocess_{args.tag}.json")
    for flag in ("vocab_file", "merge_file") + (("gcide",) if args.corpus != "unicode" else ()):
        if not os.path.isfile(getattr(args, flag)):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file (the defaults are in "
                    f"../shared/data, or set MEGAGPT_SHARED_DATA)")
    return args


# ---------------------------------------------------------------------------------------------------- corpora


def _iter_jsonl_lines(path: str):
    """Decompressed lines (with their newline) of a .jsonl or .jsonl.zst file."""
    import io
    import zstandard
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.endswith(".zst") else raw
        yield from io.BufferedReader(stream, 1 << 20)


def cut_corpus(src: str, dst: str, max_bytes: int) -> dict:
    """Copy the first whole lines of ``src`` holding at most ``max_bytes`` (at least one line) to ``dst`` (zstd)."""
    import zstandard
    written = docs = 0
    with open(dst, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as out:
        for line in _iter_jsonl_lines(src):
            if docs and written + len(line) > max_bytes:
                break
            out.write(line)
            written += len(line)
            docs += 1
    return {"path": dst, "documents": docs, "input_bytes": written}


def prepare_corpora(args, workdir: str) -> dict[str, dict]:
    max_bytes = int(args.max_mb * 1e6) if args.max_mb is not None else None
    corpora = {}
    if args.corpus in ("gcide", "both"):
        if max_bytes is None:
            lines = docs = 0
            for line in _iter_jsonl_lines(args.gcide):
                lines += len(line)
                docs += 1
            info = {"path": args.gcide, "documents": docs, "input_bytes": lines}
        else:
            info = cut_corpus(args.gcide, os.path.join(workdir, "gcide_cut.jsonl.zst"), max_bytes)
        corpora["gcide"] = info | {"source": args.gcide}
    if args.corpus in ("unicode", "both"):
        target = int(args.unicode_mb * 1e6) if max_bytes is None else min(int(args.unicode_mb * 1e6), max_bytes)
        info = write_unicode_corpus(os.path.join(workdir, "unicode.jsonl.zst"), target, args.seed)
        corpora["unicode"] = info | {"source": f"benchmarks/unicode_corpus.py (seed {args.seed})"}
    for info in corpora.values():
        info["compressed_bytes"] = os.path.getsize(info["path"])
    return corpora


# ---------------------------------------------------------------------------------------------------- runners


def run_baseline(path: str, out_bin: str, vocab_file: str, merge_file: str, ftfy_on: bool) -> dict:
    """The plain loop megagpt is measured against. Skips blank documents as megagpt does, so outputs compare."""
    import ftfy
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eod = tok.token_to_id(EOD)
    if eod is None or tok.get_vocab_size() > 65535:
        raise ValueError(f"{vocab_file}: the baseline needs a GPT-2-sized vocabulary with {EOD}")
    pieces, eod_arr, docs = [], np.array([eod], dtype=np.uint16), 0
    for line in _iter_jsonl_lines(path):
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        if ftfy_on:
            text = ftfy.fix_text(text)
        if not text.strip():
            continue
        pieces.append(np.asarray(tok.encode(text).ids, dtype=np.uint16))
        pieces.append(eod_arr)
        docs += 1
    tokens = np.concatenate(pieces)
    tokens.tofile(out_bin)
    return {"seconds": time.perf_counter() - t0, "tokens": int(tokens.size), "documents": docs,
            "input_bytes": None}


def run_megagpt(path: str, out_prefix: str, vocab_file: str, merge_file: str, ftfy_on: bool, workers: int) -> dict:
    """``preprocess()`` as tools/preprocess_data.py calls it, tokenizer loading included in the time."""
    from megagpt.data.preprocess import PreprocessOptions, preprocess
    from megagpt.data.tokenizers import build_tokenizer
    t0 = time.perf_counter()
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file, merge_file)
    report = preprocess(PreprocessOptions(inputs=[path], output_prefix=out_prefix, tokenizer=tok, append_eod=True,
                                          ftfy=ftfy_on, workers=workers, progress=False, log_interval=0))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": report["tokens"], "documents": report["documents_written"],
            "input_bytes": report["input_bytes"], "preprocess_report_seconds": report["seconds"]}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def configurations(workers: list[int]) -> list[dict]:
    configs = []
    for ftfy_on in (True, False):
        label = "ftfy" if ftfy_on else "no-ftfy"
        configs.append({"name": f"baseline {label}", "impl": "baseline", "workers": 1, "ftfy": ftfy_on})
        configs += [{"name": f"megagpt w{w} {label}", "impl": "megagpt", "workers": w, "ftfy": ftfy_on}
                    for w in workers]
    return configs


def bench_corpus(name: str, corpus: dict, args, workdir: str) -> tuple[list[dict], dict]:
    """All configurations on one corpus, ``--repeat`` interleaved rounds; returns result rows and checks."""
    configs = configurations(args.workers)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    digests: dict[str, set[str]] = {c["name"]: set() for c in configs}
    for rnd in range(args.repeat):
        for c in configs:
            out = os.path.join(workdir, f"{name}_{c['impl']}_{c['workers']}_{int(c['ftfy'])}_{rnd}")
            if c["impl"] == "baseline":
                res = run_baseline(corpus["path"], out + ".bin", args.vocab_file, args.merge_file, c["ftfy"])
                bin_path = out + ".bin"
            else:
                res = run_megagpt(corpus["path"], out, args.vocab_file, args.merge_file, c["ftfy"], c["workers"])
                bin_path = f"{out}_text_document.bin"
            digests[c["name"]].add(_sha256(bin_path))
            for f in [*Path(workdir).glob(os.path.basename(out) + ".*"), *Path(workdir).glob(os.path.basename(out) + "_*")]:
                f.unlink()  # keep the disk footprint to one run's output
            runs[c["name"]].append(res)
            print(f"  {name:8s} {c['name']:22s} round {rnd + 1}/{args.repeat}: {res['seconds']:.2f} s",
                  file=sys.stderr, flush=True)

    rows = []
    for c in configs:
        rs = runs[c["name"]]
        seconds = statistics.median(r["seconds"] for r in rs)
        row = {"corpus": name, "config": c["name"], "impl": c["impl"], "workers": c["workers"], "ftfy": c["ftfy"],
               "seconds_runs": [round(r["seconds"], 4) for r in rs], "seconds_median": round(seconds, 4),
               "input_bytes": corpus["input_bytes"], "documents": rs[0]["documents"], "tokens": rs[0]["tokens"],
               "mb_per_s": round(corpus["input_bytes"] / 1e6 / seconds, 4),
               "tokens_per_s": round(rs[0]["tokens"] / seconds, 1),
               "output_sha256": sorted(digests[c["name"]])}
        if c["impl"] == "megagpt":
            row["preprocess_report_seconds"] = [r["preprocess_report_seconds"] for r in rs]
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["impl"] == "baseline" and r["ftfy"] == row["ftfy"])
        row["ratio_vs_baseline"] = round(base["seconds_median"] / row["seconds_median"], 4)

    checks = {}
    for ftfy_on in (True, False):
        label = "ftfy" if ftfy_on else "no_ftfy"
        same = [r for r in rows if r["ftfy"] == ftfy_on]
        checks[f"megagpt_tokens_equal_baseline_{label}"] = len({d for r in same for d in r["output_sha256"]}) == 1
    megagpt_bytes = {r["input_bytes"] for rs in runs.values() for r in rs if r["input_bytes"] is not None}
    checks["megagpt_input_bytes_equal_corpus_size"] = megagpt_bytes == {corpus["input_bytes"]}
    checks["same_documents_and_tokens_per_ftfy_setting"] = all(
        len({(r["documents"], r["tokens"]) for r in rows if r["ftfy"] == f}) == 1 for f in (True, False))
    return rows, checks


# ---------------------------------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    import ftfy
    import tiktoken
    import tokenizers
    import zstandard
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "hostname": socket.gethostname(), "cpu_model": model, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"numpy": np.__version__, "ftfy": ftfy.__version__, "tokenizers": tokenizers.__version__,
                     "tiktoken": tiktoken.__version__, "zstandard": zstandard.__version__},
        "git_commit": commit,
    }


def format_table(rows: list[dict]) -> str:
    lines = [f"{'corpus':8s}  {'config':22s}  {'MB/s':>8s}  {'tokens/s':>12s}  {'vs baseline':>11s}"]
    for r in rows:
        lines.append(f"{r['corpus']:8s}  {r['config']:22s}  {r['mb_per_s']:8.2f}  {r['tokens_per_s']:12,.0f}  "
                     f"{r['ratio_vs_baseline']:10.2f}x")
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    rows, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_", dir=args.tmp_dir) as workdir:
        corpora = prepare_corpora(args, workdir)
        for name, corpus in corpora.items():
            print(f"{name}: {corpus['documents']:,} documents, {corpus['input_bytes'] / 1e6:.1f} MB decompressed",
                  file=sys.stderr, flush=True)
            corpus_rows, checks[name] = bench_corpus(name, corpus, args, workdir)
            rows += corpus_rows
    machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "preprocess",
        "note": "CPU figures (no GPU involved): wall-clock throughput on this machine only, sensitive to other load "
                "(see load_average); compare configurations within one file, not across machines.",
        "method": {
            "mb_per_s": "decompressed input bytes / median wall seconds of the whole run, tokenizer loading and "
                        "worker-pool start-up included",
            "tokens_per_s": "tokens written (EOD included) / the same seconds",
            "baseline": "one process: per document json.loads, ftfy.fix_text (ftfy configs), Hugging Face "
                        "tokenizers BPE.from_file(vocab.json, merges.txt) with ByteLevel pre-tokenizer, append "
                        "EOD, numpy concatenate, write .bin",
            "megagpt": "megagpt.data.preprocess.preprocess(), GPT2BPETokenizer, append_eod, progress off",
            "ratio_vs_baseline": "MB/s over the baseline's MB/s with the same ftfy setting",
            "checks": "sha256 of the .bin of every run; all configurations with one ftfy setting must agree",
        },
        "date_utc": started.isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items()},
        "machine": machine,
        "corpora": {n: {k: v for k, v in c.items() if k != "path"} for n, c in corpora.items()},
        "results": rows,
        "checks": checks,
    }
    write_json(args.output, result)
    print(format_table(rows))
    failed = [f"{corpus}: {name}" for corpus, cs in checks.items() for name, ok in cs.items() if not ok]
    for f in failed:
        print(f"CHECK FAILED {f}", file=sys.stderr)
    print(f"saved {args.output}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
