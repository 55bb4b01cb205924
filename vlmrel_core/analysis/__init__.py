"""The science, headless: grouped splits, probes and their layer sweep, confound controls, transfer, metrics with
bootstrap CIs, and the Table-7 report. Arrays and cached runs in, numbers and tables out; no model code."""
