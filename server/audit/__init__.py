"""Privacy audit of a finished run: the DP guarantee, what left each device, empirical tests.

canaries.py    secret canaries for audit runs (seeded by the run seed), written to the run folder
exposure.py    canary exposure (Carlini et al.) from losses, pure
membership.py  membership-inference figures (ROC AUC, TPR at low FPR, CIs, DP bound), pure
scoring.py     per-conversation losses under the final and the base model
empirical.py   the empirical tests of one run: canary exposure and membership inference
guarantee.py   the (epsilon, delta) guarantee from the config, metrics and dp-accounting
plots.py       the report's figures as PNG bytes
report.py      report.json and the self-contained report.html
"""
