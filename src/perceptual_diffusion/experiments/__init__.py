"""The fair comparison (issue #11's protocol) and the ablation: budgets, stages, folder layout, analysis and
reports. budgets.py imports no torch (the CLI lists budgets for --help)."""
