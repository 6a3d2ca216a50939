"""The random-vs-perplexity-filtered experiment from one file: corpus -> pool -> reference model -> scores ->
subsets at one token budget -> continual pretraining of each through the data-experiment runner.

A pipeline file (JSON; ``configs/experiments/data-selection/pipeline.json``)::

    {"corpus": {"input": "data/shakespeare/tinyshakespeare.txt", "txt_separator": "\\n\\n",
                "tokenizer_type": "ByteLevelTokenizer", "split": "90,5,5"},   # or {"data_path": PREFIX, "split": ...}
     "reference": {"config": "reference.json"},        # trained on the train split; or {"checkpoint": "out/gpt2"}
     "score": ["--batch-size", "16"],                  # extra tools/score_documents.py flags
     "token_budget": 250000, "seed": 1,
     "variants": {"random": ["--random"], "low": ["--keep", "low"], ...,   # tools/select_documents.py rules
                  "influence": {"scores": "influence", "rule": ["--keep", "high"]}},  # on the influence scores
     "influence": ["--batch-size", "16"],             # extra tools/influence.py flags (optional)
     "experiment": "experiment.json", "output": "out/data-selection"}

Steps (each skipped when its output is already there, so re-running the command resumes):

1. ``corpus.input`` is preprocessed into ``OUTPUT/data/corpus_text_document`` (``corpus.data_path``: used as is);
2. the documents of the corpus's ``train`` split under ``corpus.split`` (the rule training uses) as
   ``OUTPUT/data/train``; the ``test`` split stays held out, and ``experiment.json`` evaluates on it. The pool to
   select from is ``train``, or its first ``pool_documents`` documents (``OUTPUT/data/pool``: a smaller pool
   scores faster);
3. the reference (and initial) model: ``reference.config`` trained on ``train`` into ``OUTPUT/reference``
   (``reference.checkpoint``: an existing one, e.g. GPT-2 imported from Hugging Face);
4. ``tools/score_documents.py`` scores the pool with it: ``OUTPUT/scores/pool.ppl.npz`` (+ summary, histogram);
4b. when a variant selects by influence: ``tools/influence.py`` scores the pool by TracIn influence (over the reference
   run's saved checkpoints) on the corpus's ``valid`` split: ``OUTPUT/scores/pool.influence.npz``. The ``valid``
   split is held out from training like ``test``, and the experiment evaluates on ``test``: selection never sees it;
5. ``tools/select_documents.py`` writes one subset per variant at ``token_budget`` tokens:
   ``OUTPUT/subsets/<variant>``; the experiment's variants must train on exactly these;
6. ``tools/run_data_experiment.py`` continues pretraining the reference checkpoint on each subset
   (``checkpoint.init_from`` in the experiment's base config) and evaluates all on the held-out split.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megagpt.config._fields import read_json_file

PIPELINE_KEYS = ("description", "corpus", "pool_documents", "reference", "score", "influence", "token_budget", "seed",
                 "variants", "experiment", "output")
SCORE_KINDS = ("perplexity", "influence")  # which score file a variant's rule reads
REPO = Path(__file__).resolve().parent.parent.parent


@dataclass
class Pipeline:
    """A checked pipeline file; paths of configs are relative to it, data paths to the working directory."""

    path: Path
    spec: dict

    @property
    def output(self) -> Path:
        return Path(self.spec["output"])

    @property
    def corpus(self) -> str:
        corpus = self.spec["corpus"]
        return corpus.get("data_path") or str(self.output / "data" / "corpus_text_document")

    @property
    def train(self) -> str:
        return str(self.output / "data" / "train")

    @property
    def pool(self) -> str:
        return str(self.output / "data" / "pool") if self.spec.get("pool_documents") else self.train

    @property
    def reference(self) -> str:
        return self.spec["reference"].get("checkpoint") or str(self.output / "reference")

    @property
    def scores(self) -> Path:
        return self.output / "scores" / "pool.ppl.npz"

    @property
    def influence_scores(self) -> Path:
        return self.output / "scores" / "pool.influence.npz"

    def variant_rule(self, name: str) -> tuple[str, list[str]]:
        """(score kind, tools/select_documents.py flags) of variant ``name``."""
        rule = self.spec["variants"][name]
        return ("perplexity", rule) if isinstance(rule, list) else (rule["scores"], rule["rule"])

    def scores_for(self, kind: str) -> Path:
        return self.influence_scores if kind == "influence" else self.scores

    def subset(self, variant: str) -> str:
        return str(self.output / "subsets" / variant)

    @property
    def experiment(self) -> Path:
        return self.path.parent / self.spec["experiment"]


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and check a pipeline file (ValueError naming the file and the field)."""
    path = Path(path)
    spec = read_json_file(path, "pipeline file")
    unknown = sorted(set(spec) - set(PIPELINE_KEYS)) if isinstance(spec, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"{path}: a JSON object with keys from {list(PIPELINE_KEYS)} (unknown: {unknown})")
    for key in ("corpus", "reference", "token_budget", "variants", "experiment", "output"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    corpus, reference = spec["corpus"], spec["reference"]
    if ("input" in corpus) == ("data_path" in corpus) or "split" not in corpus:
        raise ValueError(f"{path}: corpus needs 'split' and one of 'input' (raw text to preprocess) or 'data_path'")
    if ("config" in reference) == ("checkpoint" in reference):
        raise ValueError(f"{path}: reference needs one of 'config' (train it on the train split) or 'checkpoint'")
    pool = spec.get("pool_documents")
    if pool is not None and (not isinstance(pool, int) or pool < 1):
        raise ValueError(f"{path}: pool_documents must be a positive integer, got {pool!r}")
    if not isinstance(spec["token_budget"], int) or spec["token_budget"] < 1:
        raise ValueError(f"{path}: token_budget must be a positive integer, got {spec['token_budget']!r}")
    if not isinstance(spec["variants"], dict) or len(spec["variants"]) < 2:
        raise ValueError(f"{path}: variants must map at least two names to tools/select_documents.py rule flags")
    for name, rule in spec["variants"].items():
        if isinstance(rule, dict) and (set(rule) != {"scores", "rule"} or rule["scores"] not in SCORE_KINDS
                                       or not isinstance(rule["rule"], list)):
            raise ValueError(f"{path}: variant {name!r}: give rule flags as a list, or {{\"scores\": one of "
                             f"{list(SCORE_KINDS)}, \"rule\": [flags]}}; got {rule!r}")
        if not isinstance(rule, (list, dict)):
            raise ValueError(f"{path}: variant {name!r}: rule flags must be a list, got {rule!r}")
    return Pipeline(path, spec)


def check_experiment(pipeline: Pipeline, experiment) -> None:
    """The experiment's variants are the pipeline's subsets, and it starts from the reference checkpoint."""
    if set(experiment.configs) != set(pipeline.spec["variants"]):
        raise ValueError(f"{experiment.path}: variants {sorted(experiment.configs)} differ from the pipeline's "
                         f"{sorted(pipeline.spec['variants'])} ({pipeline.path})")
    for name, config in experiment.configs.items():
        if config["data"]["data_path"] != [pipeline.subset(name)]:
            raise ValueError(f"{experiment.path}: variant {name!r} trains on {config['data']['data_path']}, not its "
                             f"subset [{pipeline.subset(name)!r}]")
        if config.get("checkpoint", {}).get("init_from") != pipeline.reference:
            raise ValueError(f"{experiment.path}: checkpoint.init_from must be the reference checkpoint "
                             f"{pipeline.reference!r} (every variant continues the same initial model)")


def free_port_env() -> dict:
    """This environment with ``MASTER_PORT`` set to a free port unless already set: a one-process run still opens
    a rendezvous port, and 29500 (the default) may be another job's on a shared machine."""
    import socket

    env = dict(os.environ)
    if "MASTER_PORT" not in env:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    return env


def _run(command: list[str], what: str) -> None:
    print(f"== {what}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env=free_port_env())


def _tool(name: str) -> str:
    return str(REPO / "tools" / name)


def write_documents(source_prefix: str, begin: int, end: int | None, prefix: str, rule: dict) -> dict:
    """Documents ``begin .. end - 1`` of a dataset (``end`` None: up to the train split's end under
    ``rule["split"]``) as their own dataset, ids and manifest beside it."""
    from megagpt.data.gpt_dataset import split_document_ranges
    from megagpt.selection.scores import dataset_record, open_dataset
    from megagpt.selection.subset import write_subset

    source = open_dataset(source_prefix)
    if end is None:
        begin, end = split_document_ranges(rule["split"], source.num_documents)[0]
    if end > source.num_documents:
        raise ValueError(f"{rule}: {end} documents asked for, {source_prefix} holds {source.num_documents}")
    manifest = {"source": dataset_record(source_prefix, source), "rule": rule}
    manifest = write_subset(source, np.arange(begin, end), prefix, manifest)
    print(f"== {Path(prefix).name}: {manifest['output']['documents']:,} documents "
          f"({manifest['output']['tokens']:,} tokens) in {prefix}", flush=True)
    return manifest


def prepare(pipeline: Pipeline, device: str = "auto") -> None:
    """Steps 1-5 of the module docstring, each skipped when done."""
    from megagpt.data.indexed import dataset_exists
    from megagpt.checkpoint_dir import latest_tag

    spec, out = pipeline.spec, pipeline.output
    corpus = spec["corpus"]
    if "input" in corpus and not dataset_exists(pipeline.corpus):
        command = [sys.executable, _tool("preprocess_data.py"), "--input", corpus["input"], "--tokenizer-type",
                   corpus.get("tokenizer_type", "ByteLevelTokenizer"), "--output-prefix", str(out / "data" / "corpus"),
                   "--append-eod", "--no-progress"]
        if "txt_separator" in corpus:
            command += ["--txt-separator", corpus["txt_separator"].encode("unicode_escape").decode()]
        _run(command, "preprocess the corpus")
    if not dataset_exists(pipeline.train):
        write_documents(pipeline.corpus, 0, None, pipeline.train, {"kind": "split", "split": corpus["split"],
                                                                   "name": "train"})
    if not dataset_exists(pipeline.pool):
        write_documents(pipeline.train, 0, spec["pool_documents"], pipeline.pool, {"kind": "first documents",
                                                                                   "count": spec["pool_documents"]})
    reference = Path(pipeline.reference)
    if "config" in spec["reference"]:
        config = pipeline.path.parent / spec["reference"]["config"]
        train_iters = read_json_file(config, "reference config")["schedule"]["train_iters"]
        tag = latest_tag(reference) if reference.exists() else None
        if tag is None or int(tag.removeprefix("step")) < train_iters:  # absent or unfinished: pretrain resumes
            _run([sys.executable, str(REPO / "megagpt" / "pretrain.py"), "--config", str(config), "--data-path",
                  pipeline.train, "--save", str(reference), "--device", device], "train the reference model")
    if not pipeline.scores.exists():
        _run([sys.executable, _tool("score_documents.py"), "--load", str(reference), "--data-path", pipeline.pool,
              "--output", str(pipeline.scores), "--device", device, *spec.get("score", [])], "score the pool")
    kinds = {pipeline.variant_rule(name)[0] for name in spec["variants"]}
    if "influence" in kinds and not pipeline.influence_scores.exists():
        _run([sys.executable, _tool("influence.py"), "--checkpoints", str(reference), "--data-path", pipeline.pool,
              "--valid-data-path", pipeline.corpus, "--valid-split", corpus["split"], "--valid-split-name", "valid",
              "--output", str(pipeline.influence_scores), "--device", device, *spec.get("influence", [])],
             "influence of the pool on the valid split")
    for name in spec["variants"]:
        kind, rule = pipeline.variant_rule(name)
        if not dataset_exists(pipeline.subset(name)):
            flags = [] if "--random" in rule else ["--scores", str(pipeline.scores_for(kind))]
            _run([sys.executable, _tool("select_documents.py"), "--data-path", pipeline.pool, *flags, *rule,
                  "--token-budget", str(spec["token_budget"]), "--seed", str(spec.get("seed", 0)),
                  "--output-prefix", pipeline.subset(name)], f"select {name}")


def subset_table(pipeline: Pipeline) -> str:
    """A Markdown table of the subsets: documents, tokens, their reference perplexity (median, mean) and, when the
    pool was scored by influence, their summed influence on the valid split."""
    from megagpt.selection.scores import read_scores
    from megagpt.selection.subset import read_chosen_ids, subset_paths

    scores = read_scores(pipeline.scores)
    perplexity = scores.column("perplexity")
    influence = (read_scores(pipeline.influence_scores).column("influence")
                 if pipeline.influence_scores.exists() else None)
    lines = ["| subset | rule | documents | tokens | median ref. ppl | subset ref. ppl |"
             + (" summed influence |" if influence is not None else ""),
             "|---|---|---|---|---|---|" + ("---|" if influence is not None else "")]
    for name in pipeline.spec["variants"]:
        manifest = json.loads(subset_paths(pipeline.subset(name))[0].read_text())
        ids = read_chosen_ids(pipeline.subset(name))
        nll, tokens = scores.columns["nll_sum"][ids].sum(), scores.columns["tokens"][ids].sum()
        values = perplexity[ids][np.isfinite(perplexity[ids])]
        lines.append(f"| {name} | {manifest['rule']} | {len(ids):,} | {manifest['output']['tokens']:,} | "
                     f"{np.median(values):.3f} | {np.exp(nll / tokens):.3f} |"
                     + (f" {np.nansum(influence[ids]):.4g} |" if influence is not None else ""))
    return "\n".join(lines)
