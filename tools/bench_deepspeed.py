"""Per-rank bytes of plain DeepSpeed vs memwrap under ZeRO stages 1, 2 and 3, side by side.

    python tools/bench_deepspeed.py [--hidden 512] [--layers 8] [--world 2] [--steps 3] [--dtype bf16|fp32]
                                    [--stages 1,2,3] [--offload]

For each stage and method, one run under the real `deepspeed` launcher (CPU accelerator here; on GPUs drop
DS_ACCELERATOR) trains a Llama of the given size for a few steps. Each rank reports what the engine holds — its
parameters (their shards under ZeRO-3) and the optimizer's fp32 master + moments — its peak memory (peak RSS above
the process's RSS before the model was built on CPU; torch.cuda.max_memory_allocated on a GPU), and the planner's
prediction for the same parts (memwrap.planning.estimate.zero_bytes). The table shows the largest rank.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                       num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=512,
                       tie_word_embeddings=False)


def rss_bytes() -> int:
    from memwrap.planning.rss_probe import hwm

    return hwm()  # this process image's peak RSS (ru_maxrss would carry the launcher's over exec)


def worker(args) -> None:
    """One rank of one run: build, wrap (or not), train, measure; writes rank{r}.json into args.out."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    import memwrap
    from memwrap.integrations.deepspeed import engine_bytes
    from memwrap.planning.estimate import ZeroSpec, enumerate_weights, zero_bytes

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cuda = torch.cuda.is_available()
    base_rss = rss_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args))
    weights = enumerate_weights(model, exclude=())
    layers = memwrap.wrap(model, rank=8, granularity=4).layers if args.method == "memwrap" else None
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": args.stage}}
    if args.offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=cfg)[0]
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, 8192, (args.batch, args.seq), generator=g).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    held = engine_bytes(engine)
    pb = 2 if args.dtype == "bf16" else 4
    p_params, p_grads, p_states, p_off, _ = zero_bytes(weights, layers, pb, ZeroSpec(args.stage, args.world,
                                                                                      args.offload))
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes() - base_rss
    out = {"params": held["params"], "states": held["states"], "peak": peak, "loss": losses[-1],
           "pred_params": p_params, "pred_states": p_states + p_off, "pred_grads": p_grads}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def launch(args, stage: int, method: str, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:
        pass
    port = 29700 + 10 * stage + (method == "memwrap")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.world), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "--no_local_rank", os.path.abspath(__file__), "--worker",
           "--stage", str(stage), "--method", method, "--out", out, "--world", str(args.world),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--steps", str(args.steps),
           "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)] + (["--offload"] if args.offload
                                                                                       else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:  # DeepSpeed's CPU all-reduce never unlinks its shared-memory buffers (69 MB per rank)
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
            os.remove(path)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.world)]
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--stage", type=int)
    ap.add_argument("--method")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    mb = 1e6
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.dtype}, {args.world} ranks, batch {args.batch} × "
          f"{args.seq}, {args.steps} steps{', optimizer offloaded' if args.offload else ''}; MB on the largest rank")
    head = (f"{'stage':<6}{'method':<9}{'params':>9}{'pred':>9}{'states':>9}{'pred':>9}{'peak':>9}"
            f"{'peak ratio':>12}{'loss':>8}")
    print(head)
    print("-" * len(head))
    for stage in (int(s) for s in args.stages.split(",")):
        rows = {}
        for method in ("plain", "memwrap"):
            with tempfile.TemporaryDirectory() as out:
                rows[method] = r = launch(args, stage, method, out)
            ratio = r["peak"] / rows["plain"]["peak"]
            print(f"{stage:<6}{method:<9}{r['params'] / mb:>9.1f}{r['pred_params'] / mb:>9.1f}{r['states'] / mb:>9.1f}"
                  f"{r['pred_states'] / mb:>9.1f}{r['peak'] / mb:>9.1f}{ratio:>11.2f}×{r['loss']:>8.3f}")


if __name__ == "__main__":
    main()
