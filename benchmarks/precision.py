"""Mixed precision on this machine: does bf16 speed up generation, and how far does it move it?

Usage (from the repository root)::

    python benchmarks/precision.py               # 20,000 rows (10,000 guided cells)
    python benchmarks/precision.py --rows 2000

Generation's cost on a CPU is the ScoreNet (three quarters of it) and the decoder. This
script times one ScoreNet forward pass over ``--rows`` latents (the guided batch of half as
many cells) and one decoder projection (512 cells x 13,713 genes, the chunk
``decode_counts`` uses), in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
and reports the relative difference of the outputs. Each oneDNN instruction set runs in its
own process (``ONEDNN_MAX_CPU_ISA``): a process that dies (for instance an illegal
instruction where the CPU lists AMX but the system does not enable it) is reported, not
fatal. On a GPU, pass ``--device cuda``.

Writes ``benchmarks/results/precision.json`` and ``precision.md``.
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
    h = torch.randn(512, 128, device=device)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
    result = {"rows": args.rows, "threads": args.threads, "device": args.device,
              "torch": str(torch.__version__), "machine": platform.platform(),
              "records": records}
    lines = [f"Produced by `python benchmarks/precision.py` ({args.device}, {args.threads} "
             f"threads, torch {torch.__version__}): ScoreNet forward on {args.rows:,} rows and "
             "the decoder's gene projection on 512 cells, best of "
             f"{args.repeats}.", "",
             "| oneDNN ISA | ScoreNet f32 s | ScoreNet bf16 s | rel. error | decoder f32 s | "
             "decoder bf16 s | rel. error |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "failed" in r:
            lines.append(f"| {r['isa']} | process died ({r['failed']}) | | | | | |")
            continue
        lines.append(f"| {r['isa']} | {r['scorenet_float32_s']:.3f} | "
                     f"{r['scorenet_bfloat16_s']:.3f} | {r['scorenet_relative_error']:.4f} | "
                     f"{r['decoder_float32_s']:.4f} | {r['decoder_bfloat16_s']:.4f} | "
                     f"{r['decoder_relative_error']:.4f} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "precision.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(RESULTS, "precision.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
