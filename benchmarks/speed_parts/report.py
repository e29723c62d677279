"""The markdown tables of ``benchmarks/speed.py``'s results."""

from __future__ import annotations

# labels of the generation parts in the report
PART_NAMES = {"latents": "latent sampling", "decoder and counts": "decoder and count sampling",
              "decoder products": "of which the decoder's matrix products alone"}


def _fmt(value, digits=3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _measured(results: dict, part: str) -> list[str]:
    m = results["meta"].get("parts", {}).get(part, results["meta"])
    commits = {r["commit"] for r in results.get(part, []) if isinstance(r, dict)
               and "commit" in r} if part == "scale" else set()
    commit = ", ".join(sorted(commits)) if len(commits) > 1 else m.get("commit", "?")
    return [f"Measured at commit {commit} on {m.get('processor', '?')} ({m.get('cpus', '?')} "
            f"CPUs, {m.get('threads', '?')} torch threads, {m.get('device', '?')}).", ""]


def _generation(results: dict) -> list[str]:
    g = results["generation"]
    d = 3 if g["lapddpm_seconds"] >= 0.5 else 4  # decimals: a GPU's times are small
    rows = [("LapDDPM `generate()`", g["lapddpm_seconds"])]
    rows += [(f"– {PART_NAMES.get(part, part)}", seconds)
             for part, seconds in g["parts_seconds"].items()]
    if "lapddpm_seconds_one_batch" in g:
        rows.append((f"LapDDPM `generate(batch_size={g['n_cells']})` (one batch)",
                     g["lapddpm_seconds_one_batch"]))
    rows += [("LapDDPM `generate(precision=\"bfloat16\")`", g["lapddpm_seconds_bf16"]),
             ("scVI prior sampling", g["scvi_prior_seconds"])]
    lines = ["### Generation", "", *_measured(results, "generation"),
             f"{g['n_cells']:,} cells, {g['n_genes']:,} genes, sampler {g['sampler']} "
             f"({g['n_steps']} steps); best of {len(g['lapddpm_all_seconds'])}.", "",
             "| | seconds | cells/s |", "|---|---|---|",
             *[f"| {name} | {_fmt(seconds, d)} | "
               + ("" if name.startswith("–") else _fmt(g["n_cells"] / seconds, 0)) + " |"
               for name, seconds in rows], ""]
    if "draw_profile_seconds" in g:
        lines += [f"One batch of {g['n_cells']:,} cells part by part, each between two device "
                  "synchronisations (best of the repeats for each part):", "",
                  "| part | seconds |", "|---|---|",
                  *[f"| {part} | {_fmt(seconds, 4)} |"
                    for part, seconds in g["draw_profile_seconds"].items()], ""]
    return lines


def _training(results: dict) -> list[str]:
    t = results["training"]
    lines = ["### Training (PBMC3K)", "", *_measured(results, "training"),
             "| | s/step | s/epoch | default run, s (est.) |", "|---|---|---|---|",
             f"| LapDDPM stage A | {_fmt(t['lapddpm_stage_a_step_seconds'], 4)} | "
             f"{_fmt(t['lapddpm_stage_a_epoch_seconds'])} | "
             f"{_fmt(t['lapddpm_default_seconds_estimate'], 0)} |",
             f"| LapDDPM stage B | {_fmt(t['lapddpm_stage_b_step_seconds'], 4)} | "
             f"{_fmt(t['lapddpm_stage_b_epoch_seconds'])} | |",
             f"| scVI | {_fmt(t['scvi_step_seconds'], 4)} | {_fmt(t['scvi_epoch_seconds'])} | "
             f"{_fmt(t['scvi_default_seconds_estimate'], 0)} |", "",
             f"Building a stage-A minibatch on the host (128 seed cells, a subgraph of "
             f"{t['lapddpm_stage_a_subgraph_nodes']:,} cells; included in the step above): "
             f"{_fmt(t['lapddpm_stage_a_batch_seconds'] * 1e3, 1)} ms, of which the subgraph "
             f"{_fmt(t['lapddpm_stage_a_subgraph_seconds'] * 1e3, 1)} ms (median of 30).", ""]
    if "lapddpm_default_seconds" in t:
        lines += ["Default training runs, end to end (`model.train()`):", "",
                  "| | wall s |", "|---|---|",
                  f"| LapDDPM ({t['lapddpm_default_epochs'][0]} + "
                  f"{t['lapddpm_default_epochs'][1]} epochs) | "
                  f"{_fmt(t['lapddpm_default_seconds'], 1)} |",
                  f"| scVI ({t['scvi_default_epochs']} epochs) | "
                  f"{_fmt(t['scvi_default_seconds'], 1)} |", ""]
    return lines


def _scale(results: dict) -> list[str]:
    lines = ["### Scale (synthetic atlas from PBMC3K, 2,000 genes)", "",
             *_measured(results, "scale"),
             "| cells | counts | setup s | setup peak GiB | step s | step vs smallest | "
             "step memory growth GiB | generate 100k s | generate peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["scale"]:
        storage = "backed" if r.get("backed") else "in memory"
        if "error" in r:
            lines.append(f"| {r['n_cells']:,} | {storage} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['n_cells']:,} | {storage} | {_fmt(r['setup_seconds'], 1)} | "
                     f"{_fmt(r['setup_peak_gib'], 2)} | {_fmt(r['step_seconds'], 4)} | "
                     f"{_fmt(r.get('step_time_vs_smallest', float('nan')), 2)} | "
                     f"{_fmt(r.get('step_memory_growth_gib', float('nan')), 2)} | "
                     f"{_fmt(r['generate_seconds'], 1)} | {_fmt(r['generate_peak_gib'], 2)} |")
    lines.append("")
    sampled = [r for r in results["scale"] if "pyg_k_hop_subgraph_seconds" in r]
    if sampled:
        lines += ["Host time of one stage-A minibatch of 128 random seed cells (median of 30): "
                  "the whole minibatch, its subgraph alone, and torch_geometric's "
                  "`k_hop_subgraph` finding the same neighbourhood:", "",
                  "| cells | counts | subgraph cells | minibatch ms | subgraph ms | "
                  "`k_hop_subgraph` ms |", "|---|---|---|---|---|---|",
                  *[f"| {r['n_cells']:,} | {'backed' if r.get('backed') else 'in memory'} | "
                    f"{r['subgraph_nodes']:,} | {_fmt(r['batch_seconds'] * 1e3, 1)} | "
                    f"{_fmt(r['subgraph_seconds'] * 1e3, 1)} | "
                    f"{_fmt(r['pyg_k_hop_subgraph_seconds'] * 1e3, 1)} |" for r in sampled], ""]
    on_gpu = [r for r in results["scale"] if "train_gpu_peak_gib" in r]
    if on_gpu:
        lines += ["GPU memory, peak allocated by torch:", "",
                  "| cells | counts | training GiB | generating GiB |", "|---|---|---|---|",
                  *[f"| {r['n_cells']:,} | {'backed' if r.get('backed') else 'in memory'} | "
                    f"{_fmt(r['train_gpu_peak_gib'], 2)} | "
                    f"{_fmt(r.get('generate_gpu_peak_gib', float('nan')), 2)} |"
                    for r in on_gpu], ""]
    return lines


def _tricks(results: dict) -> list[str]:
    return ["### Speed tricks against the plain paths they replace", "",
            *_measured(results, "tricks"),
            "| trick | trick ms | plain path ms | saving |", "|---|---|---|---|",
            *[f"| {name} | {_fmt(r['trick_seconds'] * 1e3, 2)} | "
              f"{_fmt(r['plain_seconds'] * 1e3, 2)} | {r['saving']:.0%} |"
              for name, r in results["tricks"].items()], ""]


def report(results: dict) -> str:
    lines = ["Produced by `python benchmarks/speed.py` (`--parts` runs some parts and keeps "
             "the others' earlier results).", ""]
    for part, section in (("generation", _generation), ("training", _training),
                          ("tricks", _tricks), ("scale", _scale)):
        if part in results:
            lines += section(results)
    return "\n".join(lines)
