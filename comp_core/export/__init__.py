"""Writing a pruned model: a physically smaller safetensors folder (``folder``, written atomically by ``atomic``),
a compressed-tensors sparse folder for mask methods (``compressed``), and a GGUF file for llama.cpp (``gguf``).

Importing this package registers the ``comp_<type>`` architectures, so ``AutoModelForCausalLM.from_pretrained`` reads
a saved folder afterwards.
"""
from .compressed import load_compressed, save_compressed
from .errors import GGUFExportError
from .folder import REPORT_FILE, folder_bytes, load_pruned, plan_export, read_report, save_pruned
from .gguf import export_gguf, export_gguf_folder

__all__ = ["GGUFExportError", "REPORT_FILE", "export_gguf", "export_gguf_folder", "folder_bytes", "load_compressed",
           "load_pruned", "plan_export", "read_report", "save_compressed", "save_pruned"]
