"""Builds small flash-linear-attention RetNets and records what fla computes with them, for test_convert_fla.py.

Run in a process of its own (``python tests/model/fla_reference.py OUT``): importing ``fla.models`` registers
fla's ``retnet`` model type with the Auto classes over ours, which the rest of the suite must not see. Without
a GPU, fla's Triton kernels run under Triton's interpreter, which takes one autotuning config per kernel, and
fla's chunk kernel, which calls ``.to()`` on a loop index (a plain int there), cannot run: the models use fla's
fused recurrent kernel (``attn_mode`` chooses a kernel, not weights).

Writes ``OUT/<variant>/`` (fla's ``save_pretrained``) and ``OUT/reference.pt``: per variant input ids and
fla's logits for them, and for one variant fla's greedy continuation of a prompt.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    autotune = triton.autotune
    triton.autotune = lambda configs, *args, **kwargs: autotune(configs[:1], *args, **kwargs)

    from retnet.kernels.chunk import _interpreter_index_fix

    _interpreter_index_fix()  # fla's runtime loop bounds hit the same Triton <= 3.6 / NumPy >= 2.4 interpreter bug

from fla.models import RetNetConfig, RetNetForCausalLM

VARIANTS = {
    # fla's defaults: swish gate fused with the head norm, SwiGLU width from hidden_ratio.
    "default": dict(num_heads=2),
    # Grouped keys/values (one key/value head per two query heads), the norm and gate unfused, tied embeddings.
    "grouped": dict(num_heads=4, num_kv_heads=2, expand_k=0.5, fuse_norm=False, tie_word_embeddings=True),
    # No output gate and a head norm without weights.
    "plain": dict(num_heads=2, use_output_gate=False, elementwise_affine=False, intermediate_size=96),
}


def main(out: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = {"device": device}
    for number, (name, overrides) in enumerate(VARIANTS.items()):
        torch.manual_seed(number)
        config = RetNetConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, fuse_cross_entropy=False,
                              attn_mode="chunk" if device == "cuda" else "fused_recurrent",
                              bos_token_id=1, eos_token_id=2, **overrides)
        model = RetNetForCausalLM(config).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:  # ones by default: random, so a misplaced norm weight shows
                    param.uniform_(0.5, 1.5)
        model.save_pretrained(os.path.join(out, name))
        model.to(device)
        ids = torch.randint(3, 101, (2, 29))  # odd, and not a multiple of our chunk size
        prompt = torch.randint(3, 101, (1, 11))
        with torch.no_grad():
            entry = {"ids": ids, "logits": model(ids.to(device)).logits.cpu(), "prompt": prompt}
            if name == "default":
                # Greedy by whole forwards: on transformers 5.24, fla 0.6.0's own generate() is right for the
                # first token only (later steps see the last token alone: it reads the cache under the old name
                # past_key_values, which transformers now passes as cache).
                generated = prompt.to(device)
                for _ in range(6):
                    generated = torch.cat([generated, model(generated).logits[:, -1:].argmax(-1)], 1)
                entry["generated"] = generated.cpu()
        reference[name] = entry
    torch.save(reference, os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
