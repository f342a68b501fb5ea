"""The bench result as one plain-text table, the same one BENCHMARKS.md quotes."""

from __future__ import annotations


def format_table(result: dict) -> str:
    """The result as one plain-text table, the same one BENCHMARKS.md quotes."""
    m, s = result["machine"], result["settings"]
    dp = result["data_path"]
    # on a machine with few cores both worker counts are the same: that pipeline was timed once, so say it once
    usual_pipes = ("usual",) if s["few_workers"] == s["workers"] else ("usual", "usual_few")
    workers_said = f"{s['workers']}" if len(usual_pipes) == 1 else f"{s['workers']} and {s['few_workers']}"
    lines = [
        f"fervit bench on {m['device']} ({m['device_name']}; {m['cpu_count']} CPUs, {m['torch_threads']} torch "
        f"threads, OMP_WAIT_POLICY {m['omp_wait_policy']}) | torch {m['torch']} | torchvision {m['torchvision']} | "
        f"kornia {m['kornia']}",
        f"command: {result['command']}",
        f"batch {s['batch_size']} (eval {s['eval_batch_size']}), amp {s['amp']}, usual pipeline with "
        f"{workers_said} DataLoader workers; {s['timing']}",
        "",
        "data path alone (augmented images/s, no model)",
        f"  fervit  device-side, batched           {dp['fervit']['images_s']:>10,.0f}",
        f"  kornia  AugmentationSequential          {dp['kornia']['images_s']:>10,.0f}   fervit/kornia "
        f"{result['kornia_ratio']:.1f}x",
        f"  usual   PIL + torchvision per image     {dp['usual']['images_s']:>10,.0f}   fervit/usual "
        f"{result['data_path_ratio']:.1f}x   ({dp['usual']['workers']} workers)",
    ]
    if "usual_few" in usual_pipes:
        lines.append(f"  usual   the same, {dp['usual_few']['workers']:>2} workers          "
                     f"{dp['usual_few']['images_s']:>10,.0f}   fervit/usual {result['data_path_ratio_few']:.1f}x")
    lines += [
        "",
        f"{'model':<10} {'pipeline':<13} {'train img/s':>11} {'epoch s':>9} {'eval img/s':>10} {'latency ms':>10} "
        f"{'peak MiB':>9} {'TFLOP/s':>8}",
    ]
    for name, row in result["models"].items():
        for pipe in ("fervit", *usual_pipes):
            r = row[pipe]
            label = f"usual {r['workers']}w" if pipe.startswith("usual") else pipe
            eval_s = f"{r['eval_images_s']:>10,.1f}" if "eval_images_s" in r else f"{'-':>10}"
            latency = f"{r['latency_ms']:>10.2f}" if "latency_ms" in r else f"{'-':>10}"
            lines.append(f"{name if pipe == 'fervit' else '':<10} {label:<13} {r['train_images_s']:>11,.1f} "
                         f"{r['epoch_s']:>9,.1f} {eval_s} {latency} {r['peak_mem_mib']:>9,.0f} {r['tflops']:>8.3f}")
        few = f"   ({row['train_ratio_few']:.2f}x against {row['usual_few']['workers']} workers)" \
            if "usual_few" in usual_pipes else ""
        lines.append(f"{'':<10} {'fervit/usual':<13} {row['train_ratio']:>10.2f}x {'':>9} {row['eval_ratio']:>9.2f}x{few}")
    lines.append("")
    peak = result["bf16_peak_tflops"]
    for name, row in result["models"].items():
        if result.get("cpu_peak"):  # a CPU's rates read better in GFLOP/s
            achieved = (f"; fervit trains at {row['fervit']['tflops'] * 1000:.0f} GFLOP/s, "
                        f"{row['fervit']['peak_fraction']:.1%} of the measured {peak * 1000:.0f} GFLOP/s bf16 conv peak")
        else:
            achieved = (f"; fervit trains at {row['fervit']['tflops']:.1f} TFLOP/s, "
                        f"{row['fervit']['peak_fraction']:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else "")
        lines.append(f"{name}: {row['params'] / 1e6:.2f}M parameters, {row['forward_gflops_per_image']:.3f} GFLOP "
                     f"forward / {row['train_gflops_per_image']:.3f} GFLOP train per image, "
                     f"{'compiled' if row['compiled'] else 'eager'}{achieved}")
    cpu = result.get("cpu_peak")
    if cpu:
        lines.append(f"CPU peak, measured (GFLOP/s): GEMM {cpu['gemm_size']}^2 fp32 {cpu['gemm_fp32']:.0f}, bf16 "
                     f"{cpu['gemm_bf16']:.0f}; conv {cpu['conv']}: fp32 NCHW {cpu['conv_fp32_nchw']:.0f}, fp32 NHWC "
                     f"{cpu['conv_fp32_nhwc']:.0f}, bf16 NCHW {cpu['conv_bf16_nchw']:.0f}, bf16 NHWC "
                     f"{cpu['conv_bf16_nhwc']:.0f}; peak = the bf16 convolution's {cpu['peak_gflops']:.0f}")
        for name, row in result["models"].items():
            f = row["fervit"]
            if "latency_fp32_ms" in f:
                lines.append(f"{name}: inference without autocast (fp32): eval {f['eval_fp32_images_s']:,.0f} img/s, "
                             f"batch-1 latency {f['latency_fp32_ms']:.2f} ms (bf16 autocast: {f['eval_images_s']:,.0f}"
                             f" img/s, {f['latency_ms']:.2f} ms); fp32 with NCHW weights, as fervit evaluated before "
                             f"bf16 and channels_last: {f['eval_fp32_nchw_images_s']:,.0f} img/s")
    elif not peak:
        lines.append("bf16 peak: not known for this device")
    lines.append(f"peak memory: {result['peak_mem_kind']}")
    lines += _breakdown_lines(result) + _step_mode_lines(result) + _concurrency_lines(result) + _as_run_lines(result)
    lines += _thread_lines(result)
    return "\n".join(lines)


def _as_run_lines(result: dict) -> list[str]:
    models = result.get("as_run", {})
    if not models:
        return []
    lines = ["", "training as each pipeline runs: a fresh process each, under its own OpenMP wait policy",
             f"{'model':<10} {'pipeline':<8} {'train img/s':>11} {'GFLOP/s':>8} {'of peak':>8}  threads wait"]
    for name, rows in models.items():
        for pipe in ("fervit", "usual"):
            if pipe in rows:
                r = rows[pipe]
                lines.append(f"{name if pipe == 'fervit' else '':<10} {pipe:<8} {r['train_images_s']:>11,.1f} "
                             f"{r['tflops'] * 1000:>8.0f} {_pct(r['peak_fraction']):>8}  {r['omp_wait']}")
        if "ratio" in rows:
            lines.append(f"{'':<10} {'fervit/usual':<13} {rows['ratio']:>6.2f}x")
    return lines


def _thread_lines(result: dict) -> list[str]:
    rows = result.get("threads_under_load", [])
    if not rows:
        return []
    lines = ["", f"training threads beside other work ({result.get('step_model')}, batch {rows[0]['batch_size']}, "
                 f"{rows[0]['steps']} timed steps; busy = one process spinning on one core)",
             f"{'threads':>7} {'busy':>5} {'train img/s':>11}"]
    lines += [f"{r['threads']:>7} {r['busy_processes']:>5} {r['train_images_s']:>11,.1f}" for r in rows]
    return lines


def _pct(fraction) -> str:
    return f"{fraction:.1%}" if fraction is not None else "-"


def _breakdown_lines(result: dict) -> list[str]:
    lines = ["", "where a training step's time goes (ms per step; wall clock with the device synchronized "
                 "between phases" + (", and torch.profiler device time)" if result["machine"]["device"] != "cpu"
                                     else ")")]
    phases = ("data_augment", "forward", "backward", "optimizer")
    lines.append(f"{'model':<10} {'clock':<8} " + " ".join(f"{p:>12}" for p in phases) + f" {'total':>9}")
    for name, row in result["models"].items():
        b = row["breakdown"]
        for clock in ("wall_ms", "device_ms"):
            if clock in b:
                ms = b[clock]
                lines.append(f"{name if clock == 'wall_ms' else '':<10} {clock[:-3]:<8} "
                             + " ".join(f"{ms.get(p, 0.0):>12.2f}" for p in phases)
                             + f" {sum(ms.get(p, 0.0) for p in phases):>9.2f}")
    return lines


def _step_mode_lines(result: dict) -> list[str]:
    rows = result.get("step_modes", [])
    attention = result.get("fused_attention", {})
    lines = ["", f"step modes of {result.get('step_model')} (lr scaled by fervit.training.step.scaled_lr: sqrt "
                 f"of batch/{result['settings']['batch_size']} for AdamW)",
             f"{'mode':<11} {'ran as':<11} {'batch':>5} {'NHWC':>5} {'lr':>9} {'train img/s':>11} {'epoch s':>8} "
             f"{'TFLOP/s':>8} {'of peak':>7} {'set-up s':>8}"]
    for r in rows:
        nhwc = "yes" if r["channels_last"] else ""
        lines.append(f"{r['mode']:<11} {r['mode_used']:<11} {r['batch_size']:>5} {nhwc:>5} "
                     f"{r['lr']:>9.2e} {r['train_images_s']:>11,.1f} {r['epoch_s']:>8,.2f} {r['tflops']:>8.3f} "
                     f"{_pct(r['peak_fraction']):>7} {r.get('setup_s', 0.0):>8.1f}")
    if attention:
        lines.append(f"fused attention: {attention['backend'] or 'none'} ({attention['detail']})")
    return lines


def _concurrency_lines(result: dict) -> list[str]:
    rows = result.get("concurrency", [])
    if not rows:
        return []
    first = rows[0]
    lines = ["", f"models trained at once, one process each ({result.get('step_model')}, step mode {first['mode']}, "
                 f"batch {first['batch_size']}, {first['steps']} timed steps per process)",
             f"{'processes':>9} {'MPS':>4} {'aggregate img/s':>15} {'x one':>6} {'TFLOP/s':>8} {'of peak':>7}  "
             "per process img/s"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['processes']:>9} {'':>4} failed: {r['error']}")
            continue
        per = ", ".join(f"{v:,.0f}" for v in r["per_process_images_s"])
        lines.append(f"{r['processes']:>9} {'yes' if r['mps'] else 'no':>4} {r['images_s']:>15,.1f} "
                     f"{r.get('x_one', 0):>5.2f}x {r['tflops']:>8.3f} {_pct(r['peak_fraction']):>7}  {per}")
    return lines

