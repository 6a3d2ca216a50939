"""Layout-independent ("universal") checkpoints: consolidate a training checkpoint of any (tp, pp, dp) layout
and ZeRO stage 0/1/2 (pipelines: ZeRO-1) into full per-parameter tensors keyed by the GPT's names
(``consolidate``), store them as safetensors + JSON (``save_universal`` / ``load_universal``), and resume them
in any other layout (``load_into_engine``). ``tools/convert_checkpoint.py`` is the command line;
megagpt/checkpoint.py loads universal directories and converts in memory when the tensor- or
pipeline-parallel size changed."""
from megagpt.convert.readers import (ParamShard, PipelineNames, param_layout, read_layout, read_tp_shards,
                                     resolve_step_dir)
from megagpt.convert.resume import load_into_engine, resume_from_universal, tp_slice
from megagpt.convert.universal import Universal, consolidate, is_universal_dir, load_universal, save_universal

__all__ = ["ParamShard", "PipelineNames", "Universal", "consolidate", "is_universal_dir", "load_into_engine",
           "load_universal", "param_layout", "read_layout", "read_tp_shards", "resolve_step_dir",
           "resume_from_universal", "save_universal", "tp_slice"]
