"""Merging LoRA task vectors: the P&M recurrence and the peer methods, planned, executed and written from files.

The package keeps mergekit's separation of plan and execution:
- recurrence: the P&M recurrence written once (theta*, the step, the closed-form alpha), which `pmserve train`
  calls after every task and `pmserve merge` replays on the task vectors' coefficients;
- methods: the registry of merge methods and the one sparsify-then-combine function behind TIES and DARE;
- base: the base model the adapters adapt (its folder, identity and weights);
- inputs: adapters (or RUNs), read and checked against each other and the base before anything is computed;
- gram: pm's alphas from the files in one streaming pass (Fisher-weighted Gram matrices of the task vectors);
- data_fisher: the Fisher of adapters trained elsewhere, from --data;
- plan: MergeOptions, and the MergePlan, pure data: alphas or weights and the effective coefficients;
- execute: a plan -> W_hat - W_0 of one module at a time;
- write: the delta, adapter and full outputs with merge_report.json; classifier: the carried or recalibrated
  inference classifier.
The file formats themselves belong to pmserve.formats.
"""

from .methods import MERGE_METHODS, MergeMethod
from .plan import FORMATS, MergeOptions, MergePlan
from .write import merge_adapters, summary

__all__ = [
    "FORMATS",
    "MERGE_METHODS",
    "MergeMethod",
    "MergeOptions",
    "MergePlan",
    "merge_adapters",
    "summary",
]
