"""The production gate: config, calibration, risk-certified thresholds, novelty and drift guards, the runtime
router, bundle I/O, fitting from a cached run, batch gating and the shift report."""
