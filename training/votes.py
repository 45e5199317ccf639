"""Galaxy Zoo vote counts as targets: the Dirichlet-multinomial likelihood of the votes.

Volunteers' answers to "what is this galaxy?" are counts x (N, K), one column per class. As
in Zoobot (Walmsley et al. 2022), the model predicts Dirichlet concentrations alpha and the
loss is the negative log-likelihood of the observed counts under the Dirichlet-multinomial:

    log P(x | alpha) = lgamma(n + 1) - sum_k lgamma(x_k + 1)
                       + lgamma(A) - lgamma(n + A) + sum_k [lgamma(x_k + alpha_k) - lgamma(alpha_k)]

with n = sum_k x_k and A = sum_k alpha_k. The concentrations are alpha = exp(logits), bounded
by clamping the logits to +-CONCENTRATION_LOGIT_LIMIT, so the Dirichlet mean alpha / A is
softmax(logits): the probabilities an exported model gives are the expected vote fractions,
with no change to export or serving. The level of the logits (which softmax ignores) carries
A, how sure the model is of those fractions.

Counts need not be integers (mixup blends the counts of two galaxies by its lambda), since
lgamma takes any positive argument.
"""

from __future__ import annotations

import torch

# alpha in [e^-10, e^10]: far beyond any vote fraction or volunteer count, and keeps lgamma
# away from its pole at 0 and from overflow.
CONCENTRATION_LOGIT_LIMIT = 10.0


def concentrations(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet concentrations alpha = exp(clamp(logits)); alpha / alpha.sum() = softmax."""
    limit = CONCENTRATION_LOGIT_LIMIT
    return torch.exp(logits.clamp(-limit, limit))


def dirichlet_multinomial_nll(
    logits: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of -log P(counts | alpha = concentrations(logits)), (N, K) each.

    `weights` (N,) scale each galaxy's term (class-balanced loss weights); the mean is still
    over the N galaxies, as the label loss's is.
    """
    if logits.shape != counts.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and counts {tuple(counts.shape)} differ")
    # float64: the terms are differences of lgamma values in the 1e5 range when the
    # concentrations are large, which float32 resolves only to a few hundredths.
    alpha = concentrations(logits.double())
    x = counts.double()
    total = x.sum(-1)
    alpha_sum = alpha.sum(-1)
    log_likelihood = (
        torch.lgamma(total + 1)
        - torch.lgamma(x + 1).sum(-1)
        + torch.lgamma(alpha_sum)
        - torch.lgamma(total + alpha_sum)
        + (torch.lgamma(x + alpha) - torch.lgamma(alpha)).sum(-1)
    )
    nll = -log_likelihood
    if weights is not None:
        nll = nll * weights.double()
    return nll.mean().float()
