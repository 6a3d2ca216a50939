"""Helpers (not fixtures) for the influence tests. The test model: a 2-layer byte-sized GPT trained for a moment on documents that count up (mod 60)
in steps of 1 or 3, and a held-out stream that counts in steps of 1 only, so that documents differ in how much
they help it."""
import numpy as np
import torch

from megagpt.config import ModelConfig

VOCAB, SEQ_LEN = 64, 16


def counting_documents(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        length, start, step = int(rng.integers(2, 40)), int(rng.integers(0, 60)), int(rng.choice([1, 3]))
        docs.append((start + step * np.arange(length)) % 60)
    return docs


def test_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=32, num_layers=2, num_heads=2,
                  make_vocab_size_divisible_by=64)
    return ModelConfig(**(values | overrides))


def train_test_model(steps: int = 60, **overrides):
    """(model, AdamW optimizer) after ``steps`` steps on ``counting_documents`` (about a second on one thread)."""
    from megagpt.model import GPT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(test_config(**overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    stream = torch.as_tensor(np.concatenate(counting_documents(400, 1)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (8,), generator=generator)
        batch = torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts])
        loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval(), optimizer


def run_config(data_path: str, steps: int = 60, **model_overrides) -> dict:
    """The training config the test checkpoints record (the run ``train_test_model`` stands for)."""
    return {"model": test_config(**model_overrides).to_dict(), "data": {"data_path": [str(data_path)]},
            "optimizer": {"kind": "adamw", "lr": 3e-3, "min_lr": 3e-4, "betas": [0.9, 0.99]},
            "schedule": {"train_iters": steps, "warmup_iters": 5}, "batch": {"micro_batch": 8, "global_batch": 8},
            "seed": 0}


def save_checkpoint(model, optimizer, out, config: dict, step: int):
    """A consolidated checkpoint of ``model`` with its AdamW moments and scheduler counts at ``step``."""
    from megagpt.convert.universal import Universal, save_universal

    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: {k: optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for group in optimizer.param_groups for p in group["params"]}
    tokens_per_step = config["batch"]["global_batch"] * config["model"]["seq_len"]
    universal = Universal(config=config, weights={n: t.detach().clone() for n, t in model.state_dict().items()},
                          moments=moments, split_dims={n: None for n in names.values()}, optimizer="torch",
                          step=float(step), client_state={"step": step, "lr_scheduler": {
                              "steps": step, "tokens": step * tokens_per_step}})
    return str(save_universal(universal, out))


def write_dataset(prefix, documents) -> str:
    from megagpt.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return str(prefix)
