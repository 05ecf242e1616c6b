"""Measuring a model's profile per pipeline granularity: ``python -m dataplane.profile MODEL_DIR``.

For each stage count K the model is served by the offline ``LLM`` with K stages, and one batch of
identical-shape greedy requests measures its throughput T_K (output tokens/s) and latency L_K (median
seconds per output token after the first). The result is a ``common.profile.ModelProfile``, stored with
``common.profile.save_profile``; ``fpctl profile MODEL`` runs this package's command.
"""

from dataplane.profile.measure import measure_granularity, measure_profile
from dataplane.profile.workload import Workload, default_stage_counts

__all__ = ["Workload", "default_stage_counts", "measure_granularity", "measure_profile"]
