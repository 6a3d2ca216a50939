"""megagpt as an lm-evaluation-harness model: ``lm_eval --model megagpt --model_args load=CHECKPOINT``.

Importing this module registers the model (tools/lm_eval.py does, then runs lm-eval's own CLI). The scoring
follows lm-eval's ``hf`` model (HFLM) so that a megagpt checkpoint and its Hugging Face export get the same
numbers:

* ``loglikelihood``: context and continuation are encoded as lm-eval's TemplateLM does (trailing spaces of the
  context move to the continuation; an empty context becomes the EOD token); ``context + continuation`` is
  left-truncated to ``max_length + 1`` tokens and its last token dropped, as HFLM does. Requests are sorted by
  length (longest first) and batched right-padded: the model is causal, so padding after a sequence never
  changes its logits. Requests whose model input is the same (multiple choice with one-token answers) share
  one forward row.
* ``loglikelihood_rolling``: lm-eval's ``get_rolling_token_windows`` / ``make_disjoint_window`` with the EOD
  token as prefix and windows of ``max_length`` tokens, summed per document.
* ``generate_until``: KV-cached, greedy unless ``do_sample``/``temperature`` ask otherwise; stops at the EOD
  token, at any ``until`` string and after ``max_gen_toks`` tokens; the context is left-truncated to
  ``max_length - max_gen_toks`` tokens. Contexts of equal token length are generated together.

No special tokens are ever added to the text (no BOS): the ``hf`` model on a GPT-2-style export (whose
tokenizer adds none and whose BOS is EOD) scores the same token sequences.
"""
from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megagpt.evaluation import score_continuations

import lm_eval.models  # noqa: F401  lm-eval registers its own models (hf, ...) only while its registry is empty

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# generation kwargs understood by generate_until (after lm-eval's normalize_gen_kwargs)
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"megagpt model_args: {name}={value!r} must be a positive integer")
    return number


@register_model("megagpt")
class MegaGPTLM(TemplateLM):
    """A megagpt checkpoint for lm-eval. model_args (``--model_args key=value,...``):

    ``load``: anything ``megagpt.convert.weights.read_model_weights`` reads (training save or step directory of
    any parallel layout, consolidated directory, or a weights file with ``model_config``); ``device`` (default
    cuda if available; lm-eval's CLI sends its ``--device``, cuda:0 unless given); ``dtype``
    float32|bfloat16|float16 (default float32); ``batch_size`` (an integer; from the CLI give ``--batch_size``,
    which lm-eval passes on: the same key in model_args too is an error); ``max_length`` (default: the model's seq_len; ALiBi / no-position models may go beyond it);
    ``max_gen_toks`` (default 256); ``seed`` (sampling); ``attention_backend``; the tokenizer: the checkpoint
    config's ``tokenizer`` section, or ``tokenizer_type`` with ``vocab_file``/``merge_file``/``tokenizer_file``/
    ``eod_token``."""

    def __init__(self, load: str | None = None, model_config: str | None = None, device: str | None = None,
                 dtype: str | torch.dtype = "float32", batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 1234, attention_backend: str | None = None, tokenizer_type: str | None = None,
                 vocab_file: str | None = None, merge_file: str | None = None, tokenizer_file: str | None = None,
                 eod_token: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"megagpt model_args: unknown {sorted(unknown)}; known: load, model_config, device, "
                             f"dtype, batch_size, max_length, max_gen_toks, seed, attention_backend, "
                             f"tokenizer_type, vocab_file, merge_file, tokenizer_file, eod_token")
        if not load:
            raise ValueError("megagpt model_args: give load=<checkpoint> (a training save dir, step dir, "
                             "consolidated dir, or a weights file with model_config=<json>)")
        # max_batch_size only sizes lm-eval's batch_size=auto search, which this model does not do
        del max_batch_size
        if str(batch_size).startswith("auto"):
            raise ValueError("megagpt model_args: batch_size=auto is not supported; give an integer")
        self._batch_size = _positive_int(1 if batch_size is None else batch_size, "batch_size")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"megagpt model_args: dtype={dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        from megagpt.convert.weights import load_gpt

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's CLI sends device=cuda:0 unless told otherwise; its hf model then quietly uses the CPU
            raise ValueError(f"device={device!r} but CUDA is not available: give --device cpu")
        self.model, self.weights = load_gpt(load, model_config, device=self._device, dtype=dtype,
                                            attention_backend=attention_backend)
        config = self.model.config
        self._max_length = config.seq_len if max_length is None else _positive_int(max_length, "max_length")
        if config.position == "learned" and self._max_length > config.seq_len:
            raise ValueError(f"megagpt model_args: max_length={self._max_length} exceeds the learned positions "
                             f"of {load} (model.seq_len={config.seq_len}); only ALiBi models run longer")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.seed = int(seed)
        self.tokenizer_object = self.weights.build_tokenizer(tokenizer_type, vocab_file, merge_file, tokenizer_file,
                                                             eod_token)
        if self.tokenizer_object.eod is None:
            raise ValueError("the tokenizer has no EOD token, which lm-eval needs as prefix of empty contexts")

    # --- what lm-eval asks of a model ---

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_object.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_object.describe()).replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in the results JSON's config."""
        return {"model_source": self.weights.source, "model_num_parameters": self.model.num_parameters(),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; no special token is ever added (megagpt models are trained without BOS)."""
        return self.tokenizer_object.encode(string).tolist()

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_object.decode(tokens)

    # --- scoring ---

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is greedy)`` for ``(strings, context_ids, cont_ids)``."""
        for strings, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"lm-eval request {strings!r} has an empty context or continuation after "
                                 f"tokenization")
        # as HFLM: the last max_length + 1 tokens of context + continuation, longest first, shared forward rows
        scores = score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                     self.max_length, self.batch_size, progress=not disable_tqdm,
                                     desc="megagpt loglikelihood")
        results = [(score.logprob, score.is_greedy) for score in scores]
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of ``max_length`` tokens (as HFLM)."""
        windows, owner = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until an ``until`` string, the EOD token or ``max_gen_toks`` tokens."""
        groups: dict[tuple, list[int]] = {}  # same generation kwargs and context length generate together
        prompts, settings = [], []
        for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
            setting = self._generation_settings(gen_kwargs)
            max_context = self.max_length - setting["max_gen_toks"]
            if max_context < 1:
                raise ValueError(f"max_gen_toks={setting['max_gen_toks']} leaves no room for the context within "
                                 f"max_length={self.max_length}: lower max_gen_toks or raise max_length")
            tokens = (self.tok_encode(context) or [self.eot_token_id])[-max_context:]  # left-truncate as HFLM
            prompts.append(tokens)
            settings.append(setting)
            key = (repr(sorted((k, repr(v)) for k, v in setting.items())), len(tokens))
            groups.setdefault(key, []).append(index)
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="megagpt generate_until")
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for indices in sorted(groups.values(), key=lambda ids: -len(prompts[ids[0]])):
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = self._generate_batch([prompts[i] for i in batch], settings[batch[0]], generator)
                for index, text in zip(batch, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        settings = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(settings) - GEN_KWARGS)
        if unknown:
            raise ValueError(f"megagpt generate_until: generation kwargs {unknown} are not supported (known: "
                             f"{sorted(GEN_KWARGS)})")
        until = settings["until"]
        settings["until"] = [until] if isinstance(until, str) else list(until or [])
        if not settings["do_sample"]:
            settings["temperature"] = 0.0
        return settings

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], settings: dict, generator: torch.Generator) -> list[str]:
        """Continue prompts of one length together with a KV cache; return each continuation's text, cut at the
        first ``until`` string."""
        from megagpt.generate import KVCache, sample_next_token

        until, max_new = [s for s in settings["until"] if s], settings["max_gen_toks"]
        eod = self.eot_token_id
        cache = KVCache(len(self.model.blocks), len(prompts[0]) + max_new)
        model_input = torch.tensor(prompts, dtype=torch.long, device=self.device)
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new):
            logits = self.model(model_input, kv_cache=cache)[:, -1]
            next_tokens = sample_next_token(logits, settings["temperature"], settings.get("top_k"),
                                            settings.get("top_p"), generator)
            for row, token in enumerate(next_tokens.tolist()):
                if done[row]:
                    continue
                if token == eod:
                    done[row] = True
                    continue
                generated[row].append(token)
                # decoding the whole continuation each step: a stop string may span several tokens
                done[row] = any(stop in self.tok_decode(generated[row]) for stop in until)
            if all(done):
                break
            model_input = next_tokens[:, None]
        texts = []
        for tokens in generated:
            text = self.tok_decode(tokens)
            for stop in until:  # as lm-eval's postprocess_generated_text
                text = text.split(stop)[0]
            texts.append(text)
        return texts
