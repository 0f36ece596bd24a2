"""A plan (the dict `plan()` returns) as a text table, and as a PNG of its memory breakdown and roofline.

matplotlib is imported only by `save_plot` (the optional `plot` extra); the planner itself does not need it.
"""
from __future__ import annotations

GiB, GB = 2**30, 1e9


def _gib_gb(n: float) -> str:
    return f"{n / GiB:10.3f} {n / GB:10.3f}"


def _si(n: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {prefix}{unit}"
    return f"{n:.4g} {unit}"


def _binary(n: float) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {prefix}"
    return f"{n:.0f} B"


def _batch_text(batch: int | None) -> str:
    return f"at batch >= {batch}" if batch else "never (each token's K/V reads grow as fast as its FLOPs)"


def format_table(p: dict) -> str:
    m, d, par, w, kv, a, mem, r, c = (p[k] for k in ("model", "device", "parallelism", "weights", "kv_cache",
                                                      "activations", "memory", "roofline", "communication"))
    lines = [
        f"jaxinfer plan: {m['name']} on {par['devices']} x {d['name']} (TP={par['tp']}, PP={par['pp']})",
        f"device: {d['memory_bytes'] / GiB:.0f} GiB, {_si(d['bandwidth_bytes_per_s'], 'B/s')}, "
        f"{_si(d['peak_flops'], 'FLOP/s')} {d['compute_dtype']} dense; ridge point "
        f"{r['ridge_flops_per_byte']:.1f} FLOP/byte; "
        + (f"JAX allocator limit {mem['limit_bytes_per_device'] / GiB:.2f} GiB" if d["platform"] != "cpu"
           else "CPU: no allocator limit"),
        f"model: {m['num_params'] / 1e9:.3f} B parameters, {m['num_layers']} layers, {m['num_heads']} heads / "
        f"{m['num_kv_heads']} KV heads x {m['head_dim']}, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
        f"vocab {m['vocab_size']}{', tied embeddings' if m['tie_word_embeddings'] else ''}",
        f"per device: {par['q_heads_per_device']} query heads, {par['kv_heads_per_device']} KV heads"
        f"{' (replicated)' if par['kv_heads_replicated'] else ''}, layers "
        + ", ".join(f"{a_}-{b_ - 1}" for a_, b_ in par["stage_layers"]) + " by stage",
        "",
        f"{'memory per device':44s} {'GiB':>10s} {'GB':>10s}",
        f"{'  weights, ' + w['format']:44s} {_gib_gb(w['per_device_bytes'])}",
        f"{'    of which replicated on the tensor axis':44s} {_gib_gb(w['replicated_bytes_per_device'])}",
        f"{'  KV pool, ' + str(kv['num_blocks']) + ' blocks x ' + str(kv['block_size']) + ' tokens':44s} "
        f"{_gib_gb(kv['allocated_bytes_per_device'])}",
        f"{'  activations / workspace (estimate)':44s} {_gib_gb(a['estimate_bytes_per_device'])}",
        f"{'  total':44s} {_gib_gb(mem['used_bytes_per_device'])}",
        f"{'  allocator limit' if d['platform'] != 'cpu' else '  memory':44s} "
        f"{_gib_gb(mem['limit_bytes_per_device'])}   "
        f"{'fits' if mem['fits'] else 'DOES NOT FIT'}",
        f"whole model: {w['total_bytes'] / GiB:.3f} GiB = {w['total_bytes'] / GB:.3f} GB of weights "
        f"(embedding / LM head {w['head_dtype']})",
        "",
        f"KV cache ({kv['dtype']}): {_binary(kv['bytes_per_token'])} per token "
        f"({_binary(kv['bytes_per_token_per_device'])} per device), "
        f"{kv['bytes_per_sequence_at_context'] / GiB:.3f} GiB per {kv['context_len']}-token sequence; "
        f"pool {kv['num_tokens']} tokens = {kv['concurrent_sequences_at_context']} sequences at "
        f"{kv['context_len']} tokens (max_model_len {kv['max_model_len']})",
        "",
        f"decode at context {r['decode_context_len']}:",
        f"  {'batch':>6s} {'FLOP/byte':>10s} {'bound':>8s} {'step ms':>9s} {'tok/s':>10s}"
        + (f" {'tok/s pipelined':>16s}" if par["pp"] > 1 else "") + f" {'KV GiB/dev':>11s}  fits",
    ]
    for row in r["decode"]:
        lines.append(f"  {row['tokens']:6d} {row['intensity_flops_per_byte']:10.2f} {row['bound']:>8s} "
                     f"{row['step_s'] * 1e3:9.3f} {row['tokens_per_s']:10.1f}"
                     + (f" {row['tokens_per_s_pipelined']:16.1f}" if par["pp"] > 1 else "")
                     + f" {row['kv_bytes_per_device'] / GiB:11.3f}  {'yes' if row['fits'] else 'no'}")
    pre = r["prefill"]
    lines += [
        f"prefill of {pre['prompt_len']} tokens in chunks of {pre['chunk_tokens']}: {pre['intensity_flops_per_byte']:.1f} "
        f"FLOP/byte, {pre['bound']}-bound, {pre['step_s'] * 1e3:.1f} ms, {pre['tokens_per_s']:.0f} tok/s",
        f"decode turns compute-bound at context {r['decode_context_len']}: "
        + _batch_text(r["decode_compute_bound_batch"]) + "; with a 1-token context (weights only): "
        + _batch_text(r["decode_compute_bound_batch_short_context"]),
    ]
    if par["devices"] > 1:
        lines.append(f"communication per token: {c['allreduces_per_token']} all-reduces, "
                     f"{_binary(c['allreduce_payload_bytes_per_token'])} payload "
                     f"({_binary(c['allreduce_traffic_bytes_per_token_per_device'])} ring traffic per device); "
                     f"point-to-point {_binary(c['p2p_bytes_per_token'])}")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def save_plot(p: dict, path: str) -> None:
    """A PNG: the per-device memory breakdown beside the roofline with the decode batches and the prefill."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'jaxinfer[plot]'") from None
    mem, w, kv, a, r, d = (p[k] for k in ("memory", "weights", "kv_cache", "activations", "roofline", "device"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    parts = [("weights", w["per_device_bytes"]), ("KV pool", kv["allocated_bytes_per_device"]),
             ("activations (est.)", a["estimate_bytes_per_device"])]
    bottom = 0.0
    for label, value in parts:
        left.bar(0, value / GiB, bottom=bottom, label=f"{label}: {value / GiB:.2f} GiB")
        bottom += value / GiB
    left.axhline(mem["limit_bytes_per_device"] / GiB, color="k", linestyle="--", label="allocator limit")
    left.axhline(d["memory_bytes"] / GiB, color="gray", linestyle=":", label="device memory")
    left.set_xticks([])
    left.set_ylabel("GiB per device")
    left.set_title(f"{p['model']['name']} on {d['name']}: memory per device")
    left.legend(loc="lower right", fontsize=8)

    peak, ridge = d["peak_flops"], r["ridge_flops_per_byte"]
    points = [(row["intensity_flops_per_byte"], row["flops_per_device"] / row["step_s"], f"decode B={row['tokens']}")
              for row in r["decode"]]
    pre = r["prefill"]
    points.append((pre["intensity_flops_per_byte"], pre["flops_per_device"] / pre["step_s"], "prefill"))
    lo = min(x for x, _, _ in points + [(ridge, 0, "")]) / 4
    hi = max(x for x, _, _ in points + [(ridge, 0, "")]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    right.loglog(xs, [min(peak, x * d["bandwidth_bytes_per_s"]) for x in xs], "k-", label="roofline")
    right.axvline(ridge, color="gray", linestyle=":", label=f"ridge {ridge:.0f} FLOP/byte")
    for x, y, label in points:
        right.loglog([x], [y], "o", label=label)
    right.set_xlabel("arithmetic intensity (FLOP/byte)")
    right.set_ylabel("FLOP/s per device")
    right.set_title("roofline (per device)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
