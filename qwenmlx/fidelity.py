"""How far a quantized model's outputs are from the original's on the same prompt."""

from pathlib import Path

import mlx.core as mx

from .checkpoint import load_model


def logits_for(model_dir: str | Path, tokens: list[int]) -> mx.array:
    """float32 logits [L, vocab] of one prompt; the model is dropped afterwards to free its memory."""
    model, _ = load_model(model_dir)
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    mx.eval(logits)
    return logits


def compare_logits(reference: mx.array, candidate: mx.array) -> dict:
    """Max abs logit difference, mean KL(reference || candidate) per position, and top-1 agreement."""
    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = candidate - mx.logsumexp(candidate, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "max_abs_logit_diff": mx.abs(reference - candidate).max().item(),
        "kl_divergence": kl.mean().item(),
        "top1_agreement": (reference.argmax(-1) == candidate.argmax(-1)).astype(mx.float32).mean().item(),
        "tokens": reference.shape[0],
    }


def compare_models(reference_dir: str | Path, candidate_dir: str | Path, tokens: list[int]) -> dict:
    """Run the prompt through both models (one at a time, so only one is resident) and compare the logits."""
    return compare_logits(logits_for(reference_dir, tokens), logits_for(candidate_dir, tokens))
