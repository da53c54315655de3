"""Two more tests on the target layer's pooled features, from the same pass as alpha.

The verdict's tests look at one filter at a time, in the predicted class's weights; ViM and
Mahalanobis on the pooled features z = mean over positions of the target layer's activations
win Table 7's sets by looking at the whole vector. The probe pass that yields alpha holds the
activations, so a handler can return z beside alpha for any CNN (no assumption on the head).
The two tests:

    Mahalanobis:  d² = (z - m_c)^T Σ^+ (z - m_c)     (m_c: class means; Σ: the tied covariance)
    residual:     r  = |(I - U U^T)(z - m)|          (m: the mean of z; U: K × K/2, the top
                                                      principal directions of z - m)

the first as Lee et al. 2018 with the predicted class (pytorch-ood's ``Mahalanobis`` takes the
nearest class), the second as the residual of ViM (Wang et al. 2022) centred at the mean of z
rather than at -W^+ b, which needs a linear head. Each names the features that carry it: d² =
sum_n e_n (Σ^+ e)_n and r² = sum_n ((I - U U^T)(z - m))_n².

The tests themselves are the library's :class:`~explainserve.anomaly.feature_tests.FeatureTests`
(the served verdict takes them). Fitted on part A of the held-out images (``split_parts``,
disjoint from the ranking part B), as the store's scales are, and combined with the verdict's three tests into the min-p statistic
exactly like the energy test (:class:`bench.ood_extended.ExtendedVerdict`, five tests).

Keep/drop criterion, written before any result of these tests was seen (the same as the
alpha-Mahalanobis test's): the served verdict takes them only if the five-test verdict's AUROC
is above the upper end of the three-test verdict's 95 % bootstrap interval on at least 3 of the
5 image sets, with its realised test FPR at 1 % within 1 ± 0.25 %. Its count of sets where it
is at least every baseline's AUROC, and of sets where its TPR at 1 % is at least Energy's, are
reported whichever way they fall. Run once, at ``bench/eval_ood.py``'s default sizes.
"""

from __future__ import annotations

from explainserve.anomaly.feature_tests import FeatureTests

__all__ = ["FeatureTests", "MAHALANOBIS", "NAME", "RESIDUAL"]

NAME = "verdict + feature tests"
MAHALANOBIS = "feature-Mahalanobis"
RESIDUAL = "feature residual"
