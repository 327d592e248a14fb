"""End-to-end speed of a LLaMA-7B-shaped model (random weights, bf16) vs the same model with every decoder linear
(q, k, v, o, gate, up, down) replaced by a DGQ A8W4 ``DGQLinear`` (random valid codes/scales, group 128, dynamic
per-token activations). Speed does not depend on the values.

Prefill: one forward over 1x2048 and 8x512 tokens (no cache), median of timed runs -> tokens/s.
Decode: batch 1 and 16, a static KV cache (transformers StaticCache) after a 128-token prompt; one decode step
(forward + greedy pick) is captured in a CUDA graph and replayed STEPS times (falls back to eager steps, and says so
in the JSON, if capture fails) -> tokens/s = batch * steps / time. Memory: torch.cuda.max_memory_allocated per phase.
DGQ runs twice: each linear alone (``dgq_a8w4``), then with sibling fusion (``dgq_a8w4_fused``: q/k/v and gate/up
as one GEMM each, the input quantized once, ``dgq.fuse_siblings``; the default of ``dgq.load``).
``--layers N`` builds fewer decoder layers (the JSON says so); ``--smoke``: a tiny config on whatever device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dgq.formats.dgq import DGQLinear, DGQWeight  # noqa: E402

LINEARS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def build_model(layers, dev, smoke):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16).eval(), cfg


def to_dgq(model, g, dev):
    gen = torch.Generator(device=dev).manual_seed(0)
    for li, layer in enumerate(model.model.layers):
        for part, names in LINEARS.items():
            mod = getattr(layer, part)
            for name in names:
                lin = getattr(mod, name)
                n, k = lin.out_features, lin.in_features
                q = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=gen)
                z = torch.full((n, k // g), 8, device=dev, dtype=torch.int8)
                s = torch.randint(1, 16, (n, k // g), device=dev, dtype=torch.int8, generator=gen)
                ch = torch.full((n,), 0.02 / 64, device=dev)
                new = DGQLinear.from_weight(DGQWeight(q, z, s, ch, g), act_mode="dynamic",
                                            name=f"layers.{li}.{part}.{name}")
                setattr(mod, name, new)
                del lin
    if dev == "cuda":
        torch.cuda.empty_cache()
    return model


@torch.no_grad()
def prefill(model, batch, seq, dev, vocab, iters):
    ids = torch.randint(0, vocab, (batch, seq), device=dev)
    times = []
    for i in range(iters + 2):
        sync(dev)
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(dev)
        if i >= 2:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(batch=batch, seq=seq, ms=med * 1e3, tokens_per_s=batch * seq / med)


@torch.no_grad()
def decode(model, cfg, batch, dev, prompt, steps):
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=prompt + steps + 16)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev)
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=dev), use_cache=True)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
    pos = torch.tensor([prompt], device=dev)

    def step():
        out = model(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos.expand(batch, 1),
                    use_cache=True)
        tok.copy_(out.logits[:, -1:].argmax(-1))
        pos.add_(1)

    for _ in range(3):  # warm up (compiles / tunes the kernels outside the graph)
        step()
    mode = "eager"
    graph = None
    if dev == "cuda":
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            sync(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            mode = "cuda-graph"
        except Exception as e:  # noqa: BLE001
            print(f"graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager steps")
            graph = None
            mode = f"eager (capture failed: {type(e).__name__})"
            sync(dev)
    pos.fill_(prompt + 4)
    run = graph.replay if graph is not None else step
    run()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    sync(dev)
    dt = time.perf_counter() - t
    return dict(batch=batch, prompt=prompt, steps=steps, mode=mode, ms_per_step=dt / steps * 1e3,
                tokens_per_s=batch * steps / dt)


def run_all(model, cfg, dev, args, tag):
    res = {}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pre = [(1, 2048), (8, 512)] if not args.smoke else [(1, 64), (2, 32)]
    for b, s in pre:
        res[f"prefill_{b}x{s}"] = prefill(model, b, s, dev, cfg.vocab_size, args.iters)
        print(f"{tag} prefill {b}x{s}: {res[f'prefill_{b}x{s}']['tokens_per_s']:.0f} tok/s", flush=True)
    for b in ([1, 16] if not args.smoke else [1, 2]):
        res[f"decode_b{b}"] = decode(model, cfg, b, dev, args.prompt, args.steps)
        print(f"{tag} decode b{b}: {res[f'decode_b{b}']['tokens_per_s']:.1f} tok/s "
              f"({res[f'decode_b{b}']['mode']})", flush=True)
    if dev == "cuda":
        res["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.layers, args.steps, args.prompt, args.iters = min(args.layers, 2), 4, 8, 1
    t0 = time.time()
    model, cfg = build_model(args.layers, dev, args.smoke)
    mem_model = torch.cuda.memory_allocated() / 2**30 if dev == "cuda" else None
    bf16 = run_all(model, cfg, dev, args, "bf16")
    bf16["weights_GiB"] = mem_model
    model = to_dgq(model, args.group, dev)
    mem_dgq = torch.cuda.memory_allocated() / 2**30 if dev == "cuda" else None
    dgq = run_all(model, cfg, dev, args, "dgq")
    dgq["weights_GiB"] = mem_dgq
    from dgq.fuse import fuse_siblings

    n_groups = sum(why is None for _, why in fuse_siblings(model))
    fused = run_all(model, cfg, dev, args, "dgq fused")
    fused["weights_GiB"] = torch.cuda.memory_allocated() / 2**30 if dev == "cuda" else None
    fused["fused_groups"] = n_groups
    ratios = {k: dgq[k]["tokens_per_s"] / bf16[k]["tokens_per_s"] for k in bf16 if isinstance(bf16[k], dict)}
    ratios_fused = {k: fused[k]["tokens_per_s"] / bf16[k]["tokens_per_s"] for k in bf16 if isinstance(bf16[k], dict)}
    import transformers
    import triton

    out = dict(card=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               date=datetime.datetime.now(datetime.UTC).isoformat(), torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__,
               model=f"LLaMA-7B shape (hidden 4096, intermediate 11008, 32 heads), {args.layers} decoder layers"
                     + ("" if args.layers == 32 else " (fewer than 32: NOT scaled)") + ", random weights, sdpa",
               dgq=f"A8W4 group {args.group}, dynamic per-token activations, every q,k,v,o,gate,up,down",
               decode_method="StaticCache, 1 step captured in a CUDA graph (forward + argmax), replayed; "
                             f"{args.steps} steps after a {args.prompt}-token prompt",
               smoke=args.smoke, bf16=bf16, dgq_a8w4=dgq, dgq_a8w4_fused=fused, speedup=ratios,
               speedup_fused=ratios_fused, seconds=time.time() - t0)
    from dgq.kernels import by_name

    tuner = by_name("triton").tuner  # the dispatch's Triton kernel: the configs it used (preloaded or tuned here)
    out["kernel_configs"] = {str(kk): str(c) for kk, c in tuner.tuned.items()}
    out["tuned_from"] = os.environ.get("DGQ_TRITON_TUNED")
    out["tune_log"] = [[str(kk), v] for kk, v in tuner.log]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_e2e.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nend to end on {out['card']} ({args.layers} layers)")
    print(f"{'':16}{'bf16 tok/s':>12}{'dgq tok/s':>12}{'speedup':>9}{'fused tok/s':>13}{'speedup':>9}")
    for k, r in ratios.items():
        print(f"{k:16}{bf16[k]['tokens_per_s']:12.1f}{dgq[k]['tokens_per_s']:12.1f}{r:9.2f}x"
              f"{fused[k]['tokens_per_s']:13.1f}{ratios_fused[k]:9.2f}x")
    if dev == "cuda":
        print(f"max allocated GiB: bf16 {bf16['max_memory_allocated_GiB']:.2f}  "
              f"dgq {dgq['max_memory_allocated_GiB']:.2f}  fused {fused['max_memory_allocated_GiB']:.2f}  "
              f"(weights+buffers {mem_model:.2f} vs {mem_dgq:.2f} vs {fused['weights_GiB']:.2f})")


if __name__ == "__main__":
    main()
