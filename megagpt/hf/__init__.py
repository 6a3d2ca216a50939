"""Hugging Face interchange: ``export_hf`` (megagpt -> transformers) and ``import_hf`` (GPT-2 or our own export ->
a megagpt consolidated checkpoint). transformers is imported only when they run; configuration_megagpt.py and
modeling_megagpt.py are the custom code shipped inside exports and import only torch and transformers."""
from megagpt.hf.export import export_hf
from megagpt.hf.import_hf import import_hf

__all__ = ["export_hf", "import_hf"]
