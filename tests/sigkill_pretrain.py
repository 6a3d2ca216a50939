"""megagpt/pretrain.py that SIGKILLs its whole process group at a chosen point: tests of crash recovery.

A SIGKILL cannot be caught: no handler, no ``finally``, no flush runs, as when the OOM killer or a
lost node ends a job. The test starts the launcher in its own session, so the group is the launcher
and every rank.

``MEGAGPT_TEST_KILL_AFTER_STEP=N``: right after rank 0 has written step N's metrics record (and before
the step's checkpoint, if it has one).
``MEGAGPT_TEST_KILL_IN_SAVE=N``: while checkpoint ``stepN`` is being written: the first of its files
gets half its bytes, then the kill.
``MEGAGPT_TEST_KILL_IN_ROLLBACK=1``: during a loss-spike recovery, right after it is recorded and before the
rollback. ``MEGAGPT_TEST_FAULT``: the faults of tests/fault_pretrain.py.
"""
import io
import os
import signal
import sys
from pathlib import Path

import torch

# this checkout's megagpt, not whichever one is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megagpt import metrics, pretrain  # noqa: E402


def _kill_group() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgrp(), signal.SIGKILL)


if "MEGAGPT_TEST_FAULT" in os.environ:
    import fault_pretrain  # noqa: E402,F401  (patches the loss at import)

if "MEGAGPT_TEST_KILL_IN_ROLLBACK" in os.environ:
    from megagpt import stability, training  # noqa: E402

    def _record_then_kill(save_dir, record):
        stability.append_recovery(save_dir, record)
        _kill_group()

    training.append_recovery = _record_then_kill

if "MEGAGPT_TEST_KILL_AFTER_STEP" in os.environ:
    _kill_step = int(os.environ["MEGAGPT_TEST_KILL_AFTER_STEP"])
    _log_train = metrics.MetricsLogger.log_train

    def _log_then_kill(self, step, *args, **kwargs):
        _log_train(self, step, *args, **kwargs)
        if step == _kill_step and self.rank == 0:  # the rank that writes the record, once it is written
            _kill_group()

    metrics.MetricsLogger.log_train = _log_then_kill

if "MEGAGPT_TEST_KILL_IN_SAVE" in os.environ:
    _save_tag = f"step{int(os.environ['MEGAGPT_TEST_KILL_IN_SAVE'])}"
    _torch_save = torch.save

    def _half_save_then_kill(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and _save_tag in Path(f).parts:
            buffer = io.BytesIO()
            _torch_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            _kill_group()
        return _torch_save(obj, f, *args, **kwargs)

    torch.save = _half_save_then_kill
    from megagpt import checkpoint  # noqa: E402

    _hashed_save = checkpoint.torch_save_hashed

    def _half_hashed_save_then_kill(obj, path, hashes):  # saves hash as they write (megagpt/checkpoint_dir.py)
        _half_save_then_kill(obj, path)
        return _hashed_save(obj, path, hashes)

    checkpoint.torch_save_hashed = _half_hashed_save_then_kill

if __name__ == "__main__":
    sys.exit(pretrain.main())
