"""Federated dropout: carve dense, smaller Conformer submodels out of a NeMo model and map their updates back.

Plain PyTorch; no Flower needed. The unit map (``units.py``) says which slices make a unit and the core's
``surgery.py`` builds the smaller model; this package decides how many units each layer keeps (``DropoutPlan``),
which ones (``choose_units``, seeded), builds the submodel (``extract``) and folds client updates back into the
global model (``aggregate``, ``ServerOptimizer``). ``partial`` (partial-variable training) says which tensors
clients train and freezes the rest (``FreezeSpec``, ``freeze_``).

    plan = DropoutPlan.targeted(report, n=2, rate=0.5, base_rate=0.1, target="ambient")   # Zhou's Amb-2
    sub, units = extract(model, plan, seed=7)           # a real EncDecCTCModelBPE (or RNNT, hybrid), smaller
    ...train sub with NeMo's loop...
    delta = aggregate(model.state_dict(), [(sub.state_dict(), units, n_examples)], model, rule="zero_fill")
"""

from nemo_layerfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "RULES": "nemo_layerfx.fd.aggregate",
    "ServerOptimizer": "nemo_layerfx.fd.aggregate",
    "aggregate": "nemo_layerfx.fd.aggregate",
    "expand": "nemo_layerfx.fd.aggregate",
    "extract": "nemo_layerfx.fd.extract",
    "plan_param_count": "nemo_layerfx.fd.extract",
    "DropoutPlan": "nemo_layerfx.fd.plan",
    "FreezeSpec": "nemo_layerfx.fd.partial",
    "freeze_": "nemo_layerfx.fd.partial",
    "trained_names": "nemo_layerfx.fd.partial",
    "targeted_layers": "nemo_layerfx.fd.plan",
    "MAPPINGS": "nemo_layerfx.fd.plan",
    "RATE_KEYS": "nemo_layerfx.fd.plan",
    "choose_units": "nemo_layerfx.fd.plan",
    "unit_seed": "nemo_layerfx.fd.plan",
})
