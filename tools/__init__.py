"""Command-line tools: model_summary, paper_tables, sweep, plot_curves, benchmark, import_weights.

Run them as modules from the repository (`python -m tools.paper_tables --list`) or as files
(`python tools/paper_tables.py --list`) once the package is installed (`pip install -e .`).
"""
