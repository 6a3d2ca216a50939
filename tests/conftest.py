"""Shared fixtures: paths to ../shared/data (the real GPT-2 BPE files and corpora)."""
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEGAGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared/data beside the repo "
                    f"(or MEGAGPT_SHARED_DATA pointing at it)")
    return path


@pytest.fixture(scope="session")
def gpt2_files():
    return (str(_require(SHARED_DATA / "gpt2" / "vocab.json")), str(_require(SHARED_DATA / "gpt2" / "merges.txt")))


@pytest.fixture(scope="session")
def gcide_path():
    return str(_require(SHARED_DATA / "gcide.jsonl.zst"))


@pytest.fixture(scope="session")
def gcide_docs(gcide_path):
    """The first 400 documents of gcide, decoded."""
    import zstandard
    docs = []
    with zstandard.ZstdDecompressor().stream_reader(open(gcide_path, "rb")) as f:
        buf = b""
        while len(docs) < 400:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            docs.extend(json.loads(line)["text"] for line in lines if line.strip())
    return docs[:400]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(root, config path) of a tiny learnable dataset and 2-layer GPT config (testing_utils.make_tiny_run)."""
    from testing_utils import make_tiny_run
    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
