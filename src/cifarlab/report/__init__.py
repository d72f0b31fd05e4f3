"""A sweep folder read back: the statistics, the table, plots, the TensorBoard view."""
