"""Planning from a memory budget, before anything is loaded.

    estimate    the byte model: predicted peak of one training step as named parts (pure arithmetic)
    planner     chooses (c, r) per layer (and the measures that make it fit) from a budget
    memory      where the budget comes from: NVML, torch.cuda, psutil
    measure     measured bytes: saved-tensor hooks, live activations (dispatch mode), gradients, optimizer state
    monitor     predicted vs measured after the first training step; memwrap.report
    rss_probe   `python -m memwrap.planning.rss_probe`: peak RSS of a step in a fresh process vs the prediction
    configs/    bundled config.json files of public models (`memwrap plan llama-2-7b` works offline)
"""
