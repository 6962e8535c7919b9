"""Fingerprints of what every method does, to show that a refactor changed no behaviour.

For every registered method on a tiny random model of every supported architecture (and, with ``--bundled``,
COMP's defaults at 20 % on the bundled SmolLM2-135M), a SHA-256 of the pruned state dict and the realised
ratio; a method that refuses a family is fingerprinted by its message. Record before moving code, compare after:

    .venv/bin/python tools/fingerprints.py --out tests/fixtures/fingerprints.json [--bundled]
    .venv/bin/python tools/fingerprints.py --check tests/fixtures/fingerprints.json [--bundled]

The tiny models are built here from fixed configs (not from the tests, which a refactor moves), on one thread,
so the hashes repeat exactly on one machine and library version.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comp_core.methods import get_method, make_settings, method_names, prune_with  # noqa: E402

VOCAB = 512
_BLOCKS = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)
_GQA = dict(intermediate_size=256, num_key_value_heads=2)
# model_type -> (config class, causal-LM class, config values beyond _BLOCKS)
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(**_GQA, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(**_GQA, head_dim=16)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=256, word_embed_proj_dim=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(**_GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(**_GQA, head_dim=16, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(**_GQA, head_dim=16, sliding_window=8)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(**_GQA, no_rope_layer_interval=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**_GQA, partial_rotary_factor=0.5)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=256, rotary_pct=0.5)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(ffn_hidden_size=256)),
}


def tiny_model(architecture: str) -> torch.nn.Module:
    config_name, model_name, values = ARCHITECTURES[architecture]
    config = getattr(transformers, config_name)(**{**_BLOCKS, **values})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def fingerprint(method: str, model: torch.nn.Module, samples: torch.Tensor, settings) -> dict:
    try:
        pruned, result = prune_with(method, model, samples, settings)
    except (ValueError, NotImplementedError) as err:  # a refusal is behaviour too
        return {"refused": " ".join(str(err).split())}
    return {"sha256": state_hash(pruned), "realised_ratio": round(float(result.realised_ratio), 10)}


def default_settings(method: str):
    """Structured methods at 20 %, mask methods at their default sparsity."""
    fields = get_method(method).settings_class.__dataclass_fields__
    return make_settings(method, **({"ratio": 0.2} if "ratio" in fields else {}))


def tiny_fingerprints(progress: bool = True) -> dict[str, dict]:
    torch.set_num_threads(1)
    samples = calibration()
    out = {}
    for architecture in ARCHITECTURES:
        model = tiny_model(architecture)
        for method in method_names():
            out[f"{method} @ {architecture}"] = fingerprint(method, model, samples, default_settings(method))
        if progress:
            print(f"  {architecture}: {len(method_names())} methods", file=sys.stderr)
    return out


def bundled_fingerprint() -> dict:
    from comp_core import get_calibration, load_model

    loaded = load_model()
    samples = get_calibration("c4", loaded.tokenizer)  # the CLI's default budget and seed
    return fingerprint("comp", loaded.model, samples, make_settings("comp", ratio=0.2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the fingerprints to this JSON file")
    target.add_argument("--check", type=Path, help="compare with this JSON file; exit 1 on any difference")
    parser.add_argument("--bundled", action="store_true", help="also COMP at 20 %% on the bundled model (C4 data)")
    args = parser.parse_args(argv)
    prints = {"torch": torch.__version__, "transformers": transformers.__version__,
              "tiny": tiny_fingerprints()}
    if args.bundled:
        prints["bundled comp 20%"] = bundled_fingerprint()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
        print(f"{len(prints['tiny'])} tiny fingerprints written to {args.out}")
        return 0
    recorded = json.loads(args.check.read_text())
    sections = {"tiny": prints["tiny"]}
    if args.bundled:
        sections["bundled"] = {"comp 20%": prints["bundled comp 20%"]}
    was = {"tiny": recorded["tiny"], "bundled": {"comp 20%": recorded.get("bundled comp 20%")}}
    differ = [f"{section}: {name}" for section, now in sections.items()
              for name in sorted(set(now) | set(was[section])) if now.get(name) != was[section].get(name)]
    total = sum(len(now) for now in sections.values())
    print(f"{total - len(differ)} of {total} fingerprints as recorded in {args.check} "
          f"(recorded with torch {recorded['torch']}, transformers {recorded['transformers']})")
    for line in differ:
        print(f"  differs: {line}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
