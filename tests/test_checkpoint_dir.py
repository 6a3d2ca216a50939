"""megagpt/checkpoint_dir.py: manifests prove a checkpoint whole, resume falls back to the newest intact one,
retention never deletes it, and checkpoint files load without running code."""
import os

import numpy as np
import pytest
import torch

from megagpt import checkpoint_dir as cd


def make_checkpoint(directory, step, payload=b"x" * 1000, manifest=True):
    step_dir = directory / cd.step_tag(step)
    step_dir.mkdir(parents=True)
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(payload + bytes([step % 256]))
    (step_dir / "config.json").write_text("{}")
    (step_dir / "nested").mkdir()
    (step_dir / "nested" / "layer_00-model_00-model_states.pt").write_bytes(b"y" * 300)
    if manifest:
        cd.write_manifest(step_dir)
    cd.atomic_write_text(directory / cd.LATEST, cd.step_tag(step))
    return step_dir


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_intact_checkpoint_has_no_problems(tmp_path):
    step_dir = make_checkpoint(tmp_path, 5)
    assert cd.checkpoint_problems(step_dir) == []
    assert cd.resume_tag(tmp_path) == ("step5", [])


@pytest.mark.parametrize("damage, named", [
    (lambda d: truncate(d / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt is 500 bytes, the manifest says 1001"),
    (lambda d: os.remove(d / "nested" / "layer_00-model_00-model_states.pt"), "layer_00-model_00-model_states.pt is missing"),
    (lambda d: (d / "config.json").write_text("[]"), "config.json does not match its checksum"),
    (lambda d: os.remove(d / cd.MANIFEST), "manifest.json is missing"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage, named):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 15)
    damage(newest)
    tag, warnings = cd.resume_tag(tmp_path)
    assert tag == "step10"
    assert named in warnings[0] and "step15" in warnings[0]
    with pytest.raises(ValueError, match="--strict-resume refuses"):
        cd.resume_tag(tmp_path, strict=True)
    with pytest.raises(ValueError, match=f"damaged or incomplete: .*{named}.*newest other checkpoint .*step10"):
        cd.verify_step_dir(newest)  # what conversion, evaluation and generation see


def test_a_verified_checkpoint_is_hashed_again_only_once_a_file_changed(tmp_path, monkeypatch):
    """Tools reach verify_step_dir through several paths: one hashing per process while nothing changed."""
    step_dir = make_checkpoint(tmp_path, 5)
    hashed, real = [], cd.checkpoint_problems
    monkeypatch.setattr(cd, "checkpoint_problems", lambda *a, **k: hashed.append(a[0]) or real(*a, **k))
    cd.verify_step_dir(step_dir)
    cd.verify_step_dir(tmp_path / "." / "step5")  # the same directory by another spelling
    assert len(hashed) == 1
    damaged = step_dir / "nested" / "layer_00-model_00-model_states.pt"
    damaged.write_bytes(b"z" * 300)  # the same size, damaged in place
    stat = damaged.stat()
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write's mtime, whatever the clock tick
    with pytest.raises(cd.DamagedCheckpoint, match="does not match its checksum"):
        cd.verify_step_dir(step_dir)


def test_no_intact_checkpoint_is_refused_naming_each(tmp_path):
    truncate(make_checkpoint(tmp_path, 5) / "config.json")
    truncate(make_checkpoint(tmp_path, 10) / "config.json")
    with pytest.raises(ValueError, match=r"no intact checkpoint .*step10.*step5"):
        cd.resume_tag(tmp_path)


def test_checkpoints_from_before_manifests_are_read_unchecked(tmp_path):
    make_checkpoint(tmp_path, 5, manifest=False)
    assert cd.resume_tag(tmp_path) == ("step5", [])
    cd.verify_step_dir(tmp_path / "step5")


def test_large_files_are_checksummed_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(cd, "BLOCK_BYTES", 100)  # 1001 bytes: 11 blocks
    step_dir = make_checkpoint(tmp_path, 1)
    import json
    manifest = json.loads((step_dir / cd.MANIFEST).read_text())
    assert len(manifest["files"]["mp_rank_00_model_states.pt"][cd.HASH]) == 11
    data = bytearray((step_dir / "mp_rank_00_model_states.pt").read_bytes())
    data[950] ^= 1  # one bit in the last block but one
    (step_dir / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    assert cd.checkpoint_problems(step_dir) == [f"{step_dir / 'mp_rank_00_model_states.pt'} does not match its "
                                                "checksum in the manifest (damaged)"]


def test_retention_never_deletes_the_newest_intact_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    truncate(make_checkpoint(tmp_path, 15) / "mp_rank_00_model_states.pt")  # a save that hit a full disk
    assert cd.prune_checkpoints(tmp_path, keep_last=1) == ["step5"]
    assert cd.step_tags(tmp_path) == ["step10", "step15"]


def test_torch_files_load_weights_only_with_the_allow_list(tmp_path):
    from megagpt.checkpoint import rng_state
    torch.save(rng_state(), tmp_path / "rng.pt")
    state = cd.load_torch_file(tmp_path / "rng.pt")
    assert np.array_equal(state["numpy"][1], np.random.get_state()[1])

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"module": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt holds objects outside megagpt's allow-list.*system"):
        cd.load_torch_file(tmp_path / "evil.pt")


def test_checkpoints_from_before_manifests_stay_good_beside_new_ones(tmp_path):
    make_checkpoint(tmp_path, 5, manifest=False)  # written by an older megagpt
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 15, manifest=False)  # a save that crashed before its manifest (and `latest`)
    cd.atomic_write_text(tmp_path / cd.LATEST, "step10")
    assert cd.prune_checkpoints(tmp_path, keep_last=2) == ["step15"]
    truncate(make_checkpoint(tmp_path, 20) / "config.json")
    tag, warnings = cd.resume_tag(tmp_path)
    assert tag == "step10"
    truncate(tmp_path / "step10" / "config.json")
    tag, warnings = cd.resume_tag(tmp_path)
    assert tag == "step5" and "written before manifests (not verified)" in warnings[-1]


@pytest.mark.parametrize("size", [0, 1, 99, 100, 250, 300])
def test_hashes_taken_while_writing_equal_a_read_back(tmp_path, monkeypatch, size):
    monkeypatch.setattr(cd, "BLOCK_BYTES", 100)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(tmp_path / "f.bin", "wb") as f:
        writer = cd.HashingWriter(f)
        for start in range(0, size, 37):  # writes that straddle block boundaries
            writer.write(data[start:start + 37])
    assert writer.entry() == cd._checksums(tmp_path, ["f.bin"])["f.bin"]


def test_manifest_takes_recorded_hashes_and_reads_back_the_rest(tmp_path, monkeypatch):
    step_dir = tmp_path / "step1"
    step_dir.mkdir()
    hashes = {}
    cd.torch_save_hashed({"w": torch.arange(10)}, step_dir / "model.pt", hashes)
    (step_dir / "config.json").write_text("{}")  # written without hashing
    cd.write_hashes_part(step_dir, 0, hashes)
    read_back = []
    checksums = cd._checksums
    monkeypatch.setattr(cd, "_checksums", lambda d, names: read_back.extend(names) or checksums(d, names))
    cd.write_manifest(step_dir)
    assert read_back == ["config.json"] and not list(step_dir.glob(".hashes*"))
    monkeypatch.setattr(cd, "_checksums", checksums)
    assert cd.checkpoint_problems(step_dir) == []
