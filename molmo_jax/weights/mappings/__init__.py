"""Name-and-layout mappings, one file per family of checkpoints, each a list of `weights.rules.Rule`
plus the config translation: `molmo` (original and released Molmo), `clip` (base CLIP vision
towers), `hf_llm` (base Qwen2 / OLMo-2 / OLMoE decoders)."""
