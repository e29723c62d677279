"""Mixed precision on this machine: does bf16 speed up generation, and how far does it move it?

Usage (from the repository root)::

    python benchmarks/precision.py               # 20,000 rows (10,000 guided cells)
    python benchmarks/precision.py --rows 2000
    python benchmarks/precision.py --quality pbmc3k   # scores, float32 against bf16

Generation's cost on a CPU is mostly matrix products: the ScoreNet's (the latents) and the
decoder's gene projections; the count draws are the rest. This script times one ScoreNet
forward pass over ``--rows`` latents (the guided batch of half as many cells) and one
decoder projection (512 cells x 13,713 genes, the chunk
``decode_counts`` uses), in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
and reports the relative difference of the outputs. Each oneDNN instruction set runs in its
own process (``ONEDNN_MAX_CPU_ISA``): a process that dies (for instance an illegal
instruction where the CPU lists AMX but the system does not enable it) is reported, not
fatal. On a GPU, pass ``--device cuda``.

Writes ``benchmarks/results/precision.json`` and ``precision.md`` (on a GPU
``precision_cuda.*``, with the decoder on half of ``--rows`` cells, a GPU's batch).

With ``--quality DATASET``, it instead takes the LapDDPM models ``quality.py`` trained on
that dataset's splits and scores ``generate()`` in float32 and under ``torch.autocast`` in
bf16, a few draws each, as ``quality.py`` scores: whether bf16 moves the cells beyond the
spread between draws. Writes ``precision_quality_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ISAS = ("default", "AVX512_CORE_BF16", "AVX2")


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def worker(rows: int, repeats: int, device: str) -> dict:
    from scldiff.module._scorenet import ScoreNet

    torch.manual_seed(0)
    net = ScoreNet(16, 9).to(device).eval()
    for p in net.parameters():  # trained-like weights (FiLM starts at zero)
        p.data.normal_(0.0, 0.05)
    z = torch.randn(rows, 16, device=device)
    t = torch.full((rows,), 0.5, device=device)
    labels = torch.randint(0, 10, (rows,), device=device)
    decoder = torch.nn.Linear(128, 13_713).to(device)
    # the decoder's input: a CPU's chunk of cells (decode_counts), a GPU's whole batch
    h = torch.randn(512 if device == "cpu" else rows // 2, 128, device=device)
    out = {}
    with torch.inference_mode():
        reference = net(z, t, labels)
        logits = decoder(h)
        out["scorenet_float32_s"] = _best(lambda: net(z, t, labels), repeats)
        out["decoder_float32_s"] = _best(lambda: decoder(h), repeats)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            low = net(z, t, labels).float()
            low_logits = decoder(h).float()
            out["scorenet_bfloat16_s"] = _best(lambda: net(z, t, labels), repeats)
            out["decoder_bfloat16_s"] = _best(lambda: decoder(h), repeats)
    out["scorenet_relative_error"] = float((low - reference).norm() / reference.norm())
    out["decoder_relative_error"] = float((low_logits - logits).norm() / logits.norm())
    return out


def quality_check(dataset: str, seeds: list[int], draws: int, device: str) -> None:
    """Scores of ``generate()`` in float32 and under bf16 autocast on ``quality.py``'s
    models of ``dataset`` (the same seeds for both, so only the precision differs)."""
    import warnings

    import numpy as np

    import scldiff

    sys.path.insert(0, HERE)
    import quality
    from sampler_steps import METRICS, cached_split, mean_sd, write_results

    warnings.filterwarnings("ignore")
    adata = quality.load_dataset(dataset, quality.DEFAULT_DATA_DIR)
    records = []
    for seed in seeds:
        _, test, label_counts, path = cached_split(adata, dataset, seed)
        model = scldiff.LapDDPM.load(path, adata=False)
        model.to_device(device)  # autocast acts on the device it names
        for draw in range(draws):
            for precision in ("float32", "bfloat16"):
                with torch.autocast(device_type=device, dtype=torch.bfloat16,
                                    enabled=precision == "bfloat16"):
                    generated = quality.lapddpm_generate(model, label_counts,
                                                         seed + 100 * draw, {}, test)
                metrics = quality.score(test, generated, seed)
                record = {"seed": seed, "draw": draw, "precision": precision,
                          **{name: metrics.get(key) for name, key in METRICS.items()}}
                records.append(record)
                print(json.dumps(record), flush=True)
    result = {"dataset": dataset, "seeds": seeds, "draws": draws, "device": device,
              "processor": _processor() if device == "cpu" else torch.cuda.get_device_name(),
              "commit": quality.meta()["commit"], "records": records}
    lines = [f"Produced by `python benchmarks/precision.py --quality {dataset}`: the LapDDPM "
             f"models of `quality.py` (seeds {', '.join(map(str, seeds))}), {draws} draw(s) "
             f"each, `generate()` in float32 and under `torch.autocast(\"{device}\", "
             f"dtype=torch.bfloat16)` with the same seeds; mean ± sd over all draws. Code at "
             f"commit {result['commit']}.", "",
             "| precision | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for precision in ("float32", "bfloat16"):
        rows = [r for r in records if r["precision"] == precision]
        cells = [mean_sd(np.array([r[n] for r in rows], dtype=float)) for n in METRICS]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    write_results(os.path.join(RESULTS, f"precision_quality_{dataset}"), result,
                  "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quality", default=None, metavar="DATASET",
                        help="score generate() in float32 and bf16 on quality.py's models")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quality:
        quality_check(args.quality, args.seeds, args.draws, args.device)
        return
    if args.worker:
        print(json.dumps(worker(args.rows, args.repeats, args.device)))
        return
    records = []
    for isa in ISAS if args.device == "cpu" else ("default",):
        env = dict(os.environ)
        if isa != "default":
            env["ONEDNN_MAX_CPU_ISA"] = isa
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", "--rows", str(args.rows),
             "--repeats", str(args.repeats), "--threads", str(args.threads),
             "--device", args.device], capture_output=True, text=True, env=env)
        record = {"isa": isa}
        if done.returncode == 0:
            record.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            name = (signal.Signals(-done.returncode).name if done.returncode < 0
                    else f"exit {done.returncode}")
            record["failed"] = f"{name}: {(done.stderr.strip().splitlines() or [''])[-1]}"
        records.append(record)
        print(json.dumps(record), flush=True)
    processor = _processor() if args.device == "cpu" else torch.cuda.get_device_name()
    result = {"rows": args.rows, "threads": args.threads, "device": args.device,
              "repeats": args.repeats,
              "processor": processor, "torch": str(torch.__version__),
              "machine": platform.platform(), "records": records}
    text = report(result)
    os.makedirs(RESULTS, exist_ok=True)
    name = "precision" if args.device == "cpu" else f"precision_{args.device}"
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as handle:
        handle.write(text)
    print(text)


def report(result: dict) -> str:
    """The markdown table of a ``precision.json`` (times in ms on a GPU)."""
    gpu = result["device"] != "cpu"
    unit, factor, digits = ("ms", 1e3, 3) if gpu else ("s", 1.0, 4)
    rows = result["rows"]
    lines = [f"Produced by `python benchmarks/precision.py` ({result['device']}: "
             f"{result['processor']}, {result['threads']} threads, torch {result['torch']}): "
             f"ScoreNet forward on {rows:,} rows and the decoder's gene projection on "
             f"{rows // 2 if gpu else 512:,} cells, best of {result['repeats']}.", "",
             f"| oneDNN ISA | ScoreNet f32 {unit} | ScoreNet bf16 {unit} | rel. error | "
             f"decoder f32 {unit} | decoder bf16 {unit} | rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if "failed" in r:
            lines.append(f"| {r['isa']} | process died ({r['failed']}) | | | | | |")
            continue
        lines.append(f"| {r['isa']} | " + " | ".join(
            f"{r[key] * factor:.{digits}f}" if key.endswith("_s") else f"{r[key]:.4f}"
            for key in ("scorenet_float32_s", "scorenet_bfloat16_s", "scorenet_relative_error",
                        "decoder_float32_s", "decoder_bfloat16_s", "decoder_relative_error"))
                     + " |")
    return "\n".join(lines) + "\n"


def _processor() -> str:
    sys.path.insert(0, HERE)
    from speed import processor

    return processor()


if __name__ == "__main__":
    main()
