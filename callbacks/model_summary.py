"""Lightning's model summary without a FLOPs count it did not make.

Lightning counts FLOPs only for a model with an ``example_input_array``; for any other model
its summary prints a ``FLOPs`` column of zeros and ``0  Total Flops``, which reads as a
measurement. This summary leaves both out when the count is 0 and is Lightning's otherwise.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary

# the logger that Lightning's ModelSummary.summarize writes the table to
SUMMARY_LOGGER = "lightning.pytorch.callbacks.model_summary"


class _DropZeroFlops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Total Flops" in msg:
            record.msg = "\n".join(ln for ln in msg.split("\n") if not ln.endswith("Total Flops"))
            record.args = ()
        return True


class ModelSummary(LightningModelSummary):
    """Lightning's ModelSummary (same arguments); no FLOPs column or total when they were not counted."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            return LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                                   total_training_modes, total_flops=total_flops, **summarize_kwargs)
        summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        log = logging.getLogger(SUMMARY_LOGGER)
        drop = _DropZeroFlops()
        log.addFilter(drop)
        try:
            LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                            total_training_modes, total_flops=total_flops, **summarize_kwargs)
        finally:
            log.removeFilter(drop)
