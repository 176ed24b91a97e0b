"""The training FLOPs of a token and each device's peak, for the MFU estimate (the log, ``benchmarks/train.py``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

# Dense bf16 tensor-core peak per device (FLOP/s), for the MFU estimate; matched as substrings of
# torch.cuda.get_device_name(), the longest first. Set logging.peak_flops for anything else (or a CPU).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "GB200": 2500e12,  # the Grace-Blackwell superchip's GPUs run faster than the HGX B200's
    # the PCIe and NVL cards run at lower clocks than the SXM modules: taken for those, their MFU reads a quarter low
    "H100 PCIe": 756e12, "H800 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def retention_form(config, seq_len: int, device: torch.device | str | None = None) -> tuple[str, int]:
    """(form, span) of the retention a training forward of ``seq_len``-token sequences runs on ``device`` (None: the
    CPU), as the model resolves ``config.retention_mode``: on the Triton kernels (a CUDA device) the chunkwise form in
    tiles of ``chunk_size`` rounded up to a power of two within [16, 64] (``retention_mode="parallel"`` is the same
    op at its default chunk of 64), on the PyTorch references (the CPU, ``RETNET_KERNELS=torch``) ``auto``'s parallel
    form up to :data:`~retnet.model.modeling_retnet.REFERENCE_PARALLEL_MAX_LEN` tokens and chunkwise beyond, a chunk
    no longer than the sequence. ``span``: the chunk length, the sequence length (parallel), 0 (recurrent)."""
    from retnet import kernels
    from retnet.model.modeling_retnet import REFERENCE_PARALLEL_MAX_LEN

    try:
        triton = kernels.use_triton(torch.empty(0, device=device or "cpu"))
    except ValueError:  # (RETNET_KERNELS names a path this device cannot take: the first forward says so)
        triton = False
    mode = config.retention_mode
    if mode == "auto":
        mode = ("recurrent" if seq_len == 1 else
                "chunkwise" if triton or seq_len > REFERENCE_PARALLEL_MAX_LEN else "parallel")
    if mode == "recurrent":
        return mode, 0
    if triton:  # (the parallel form's op there is the chunkwise one at its default chunk_size, 64)
        from retnet.kernels.chunk import _block_size

        return "chunkwise", min(seq_len, _block_size(config.chunk_size if mode == "chunkwise" else 64))
    if mode == "parallel":
        return mode, seq_len
    return mode, min(config.chunk_size, seq_len)


def retention_flops(config, seq_len: int, device: torch.device | str | None = None) -> float:
    """Forward FLOPs per token of the retention (every layer and head; key dim K, value dim V) in the form
    :func:`retention_form` says runs. Chunkwise, chunk C: the state multiplied in and out (q·S, kᵀ·v: 2·2·K·V)
    and the intra-chunk q·kᵀ and (q·kᵀ)·v (2·C·K + 2·C·V). Parallel, sequence length T: the whole T × T scores,
    masked after the matmul (2·T·K + 2·T·V), no state. Recurrent: the state alone (4·K·V). ``seq_len`` is the
    longest a sequence runs: documents packed shorter cost the parallel form less than counted, and on a CPU
    a block of documents all within 256 tokens runs the parallel form where the block's length counts chunkwise
    (the model picks the form by the longest document)."""
    form, span = retention_form(config, seq_len, device)
    k_dim, v_dim = config.head_dim, config.value_head_dim
    per_head = 2 * span * (k_dim + v_dim) + (0 if form == "parallel" else 4 * k_dim * v_dim)
    return float(config.num_hidden_layers * config.num_attention_heads * per_head)


def flops_per_token(config, seq_len: int, adapter_params: int | None = None, output_head: bool = True,
                    device: torch.device | str | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward).

    Matmuls: 6·N with N the parameters minus the input embedding (a lookup), plus the output projection
    even when tied; with ``adapter_params`` n (LoRA: those N frozen, n adapter weights training) 4·N, no
    weight gradients, plus the adapters' 6·n. Retention: :func:`retention_flops` of the form training runs on
    ``device`` (the parallel form's cost grows with ``seq_len``, the chunkwise form's with the chunk).
    ``output_head=False``: a classifier (a reward model), whose one-label ``score`` reads a sequence's last token
    only, and has no vocabulary projection at every token."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    k_dim, v_dim = config.head_dim, config.value_head_dim
    ffn = config.intermediate_size * d * (3 if config.ffn_glu else 2)
    value_projections = 2 if config.use_output_gate else 1  # v, and the gate g when there is one
    per_layer = d * heads * k_dim * 2 + d * heads * v_dim * value_projections + heads * v_dim * d + ffn
    n_matmul = layers * per_layer + (config.vocab_size * d if output_head else 0)
    retention = retention_flops(config, seq_len, device)
    if adapter_params is not None:
        return 4.0 * n_matmul + 6.0 * adapter_params + 3.0 * retention
    return 6.0 * n_matmul + 3.0 * retention


def head_flops_per_token(config, adapter_params: int | None = None) -> float:
    """The vocabulary projection's part of :func:`flops_per_token` (6·V·d; 4·V·d frozen under LoRA): what each
    token whose logits a step does not compute (``logits_to_keep``: DPO's, KTO's and GRPO's prompts) saves."""
    return (4.0 if adapter_params is not None else 6.0) * config.vocab_size * config.hidden_size


class StepFlops(NamedTuple):
    """The FLOPs of a step from its token counts: ``per_token`` (:func:`flops_per_token`) at every token, less
    ``head`` (:func:`head_flops_per_token`) at each whose logits are not computed."""

    per_token: float
    head: float

    def __call__(self, tokens: int, head_tokens: int | None = None) -> float:
        """``head_tokens``: the tokens whose logits are computed (None: every one)."""
        if head_tokens is None:
            return tokens * self.per_token
        return tokens * (self.per_token - self.head) + head_tokens * self.head


def peak_flops(device: torch.device, configured: float) -> float | None:
    """Per-device peak FLOP/s: ``logging.peak_flops`` if set, else the GPU table, else None (n/a)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
            if key in name:
                return value
    return None
