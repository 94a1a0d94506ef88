"""Federated dropout: carve dense, smaller Conformer submodels out of a NeMo model and map their updates back.

Plain PyTorch; no Flower needed. The unit map (``units.py``) says which slices make a unit and the core's
``surgery.py`` builds the smaller model; this package decides how many units each layer keeps (``DropoutPlan``),
which ones (``choose_units``, seeded), builds the submodel (``extract``) and folds client updates back into the
global model (``aggregate``, ``ServerOptimizer``).

    plan = DropoutPlan.targeted(report, n=2, rate=0.5, base_rate=0.1, target="ambient")   # Zhou's Amb-2
    sub, units = extract(model, plan, seed=7)           # a real EncDecCTCModelBPE (or RNNT, hybrid), smaller
    ...train sub with NeMo's loop...
    delta = aggregate(model.state_dict(), [(sub.state_dict(), units, n_examples)], model, rule="zero_fill")
"""

from nemo_layerfx.fd.aggregate import RULES, ServerOptimizer, aggregate, expand
from nemo_layerfx.fd.extract import extract, plan_param_count
from nemo_layerfx.fd.plan import MAPPINGS, RATE_KEYS, DropoutPlan, choose_units, unit_seed

__all__ = ["DropoutPlan", "MAPPINGS", "RATE_KEYS", "RULES", "ServerOptimizer", "aggregate", "choose_units",
           "expand", "extract", "plan_param_count", "unit_seed"]
