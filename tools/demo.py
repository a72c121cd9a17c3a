"""`make demo`: the main job on the embedded default data.

Interim version: renders a synthetic PixMo scene, preprocesses it with a pointing question, and runs
a tiny (untrained) Molmo through prefill and greedy decoding, printing what each stage produced.
"""
import sys
import time

import numpy as np


def main():
    from input_pipeline import synthetic
    from molmo_jax import config as config_lib
    from molmo_jax import generate, model as model_lib
    from molmo_jax.preprocess import Collator, MolmoTokenizer, Preprocessor

    t0 = time.time()
    cfg = config_lib.tiny()
    cfg.init = "fan_in"
    example = synthetic.render_example(synthetic.SyntheticOptions(kinds=("shapes",), kind_weights=(1.0,)),
                                       seed=0, split="test", index=0)
    image = example["image"]
    question = {"style": "pointing", "question": "Point to the shapes."}
    tok = MolmoTokenizer("molmo_jax/assets/tiny_tokenizer", cfg.llm.vocab_size)
    pre = Preprocessor(cfg, tok)
    ex = pre({"image": image, "message_list": [question]}, for_inference=True)
    batch = Collator()([ex])
    print(f"image {image.shape[1]}x{image.shape[0]} -> tiling {ex['tiling'].tolist()}, "
          f"{batch['images'].shape[1]} crops, {batch['input_ids'].shape[1]} tokens")
    model = model_lib.create_model(cfg)
    print(f"tiny Molmo: {model_lib.count_params(model):,} parameters (random init)")
    out = generate.Generator(model, tok.eos_id)(batch, generate.Sampling(max_new_tokens=16))
    print(f"generated {int(out['lengths'][0])} tokens: {tok.decode(out['tokens'][0][out['tokens'][0] >= 0])!r}")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
