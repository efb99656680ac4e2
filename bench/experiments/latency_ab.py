"""A/B of server settings under `rag-bench latency`, in short interleaved rounds (ABAB...) on one machine.

    python bench/experiments/latency_ab.py --index /tmp/lead/scifact_full \
        --queries ../shared/data/scifact/queries.jsonl \
        --variant off=RAG_ENCODER__MICRO_BATCH_MS=0 --variant mb2=RAG_ENCODER__MICRO_BATCH_MS=2 \
        --qps 10,20,40 --rounds 4 --duration 8 -- --rerank off

On a shared machine the background load drifts by more than most settings change, so one long run per setting
measures the drift. Here every variant gets its own `rag-serve` child (started once, all alive together, each
configured by environment variables), and each round sends every rate to every variant in turn, with the order
reversed every other round, through the real `rag-bench latency` command (`--target`). Reported per variant and rate:
the median of the rounds' p50 and p99 with their range, the requests that failed (by status), and the routes taken.
Arguments after `--` go to `rag-bench latency` unchanged (`--rerank off`, `--timeout 0.1`, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from rag_service.bench.serve import SAFE_PATH, ServerProcess


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    env = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("RAG_"):
            raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=RAG_X=V[,RAG_Y=W]")
        env[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: missing name")
    return name, env


def load_average() -> float:
    return os.getloadavg()[0]


def one_run(target: str, queries: Path, rate: float, args: argparse.Namespace, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "latency.json"
        command = [sys.executable, "-m", "rag_service.cli.bench", "latency", "--target", target, "--queries",
                   str(queries), "--qps", f"{rate:g}", "--duration", str(args.duration), "--warmup",
                   str(args.warmup), "--no-floor", "--seed", str(args.seed), "--json", str(out), *extra]
        # The installed package, not the source tree of the working directory (which has no compiled kernels).
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **SAFE_PATH})
        if done.returncode != 0:
            raise RuntimeError(f"rag-bench latency failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        report = json.loads(out.read_text())
    return report["rates"][0]["search"]


def summarize(rows: list[dict]) -> dict:
    p50 = np.array([r["latency_ms"]["p50"] for r in rows])
    p99 = np.array([r["latency_ms"]["p99"] for r in rows])
    errors: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    for r in rows:
        errors.update(r.get("errors", {}))
        routes.update(r.get("routes", {}))
    return {"rounds": len(rows), "p50_median": float(np.median(p50)), "p50_min": float(p50.min()),
            "p50_max": float(p50.max()), "p99_median": float(np.median(p99)), "p99_min": float(p99.min()),
            "p99_max": float(p99.max()), "sent": int(sum(r["sent"] for r in rows)),
            "ok": int(sum(r["ok"] for r in rows)), "errors": dict(errors), "routes": dict(routes.most_common()),
            "within_budget": (int(sum(r["within_budget"] for r in rows)) if all("within_budget" in r for r in rows)
                              else None),
            "load_avg": [r["load_avg"] for r in rows]}


def parse_quality(text: str) -> dict[str, float]:
    """ROUTE=nDCG,...,*=nDCG: a route's measured quality (bench/experiments/adaptive.py), '*' for every other route."""
    out = {}
    for item in filter(None, text.split(",")):
        route, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--route-quality {text!r}: expected ROUTE=VALUE[,...]")
        out[route] = float(value)
    if "*" not in out:
        raise argparse.ArgumentTypeError(f"--route-quality {text!r}: needs '*=VALUE' for the other routes")
    return out


def expected_quality(routes: dict[str, int], quality: dict[str, float]) -> float | None:
    """The answered requests' mean quality, from the share of each route. Unbiased when the route does not depend on
    the query (the brownout dimmer picks by error diffusion, not by content); an estimate, not a measurement."""
    total = sum(routes.values())
    if not total:
        return None
    return sum(n * quality.get(route, quality["*"]) for route, n in routes.items()) / total


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=RAG_SETTING=VALUE[,RAG_OTHER=VALUE]: a server configured by these variables")
    parser.add_argument("--qps", default="10,20,40")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--prime", type=float, default=0.0,
                        help="seconds of unmeasured traffic at the lowest rate sent to every server before round 1: "
                             "a fresh server's first requests are slow (its per-chunk token counts are still being "
                             "filled), which would charge round 1 for the start-up, not the setting")
    parser.add_argument("--route-quality", type=parse_quality, default=None,
                        help="ROUTE=nDCG,...,*=nDCG: print each variant's expected quality from its route mix, e.g. "
                             "lexical=0.6865,*=0.7426 (SciFact test, bench/README.md)")
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.qps.split(",") if x.strip()]
    names = [name for name, _ in args.variant]
    if len(set(names)) != len(names):
        parser.error("variant names must differ")

    results: dict[str, dict[float, list[dict]]] = {name: {rate: [] for rate in rates} for name in names}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(args.index, workers=args.workers, extra_env=env))
                   for name, env in args.variant}
        print("servers: " + ", ".join(f"{n} {s.target} ({args.variant[i][1]})"
                                      for i, (n, s) in enumerate(servers.items())), flush=True)
        if args.prime > 0:
            priming = argparse.Namespace(**{**vars(args), "duration": args.prime, "warmup": 0.0,
                                            "seed": args.seed + 1})
            for name in names:
                one_run(servers[name].target, args.queries, min(rates), priming, extra)
            print(f"primed every server with {args.prime:g} s at {min(rates):g}/s", flush=True)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for rate in rates:
                for name in order:
                    load = load_average()
                    started = time.monotonic()
                    row = one_run(servers[name].target, args.queries, rate, args, extra)
                    row["load_avg"] = load
                    results[name][rate].append(row)
                    lat = row["latency_ms"]
                    print(f"round {r + 1} {rate:g}/s {name:<10} p50 {lat['p50']:8.1f} p99 {lat['p99']:8.1f} ms  "
                          f"ok {row['ok']}/{row['sent']} errors {row.get('errors') or 0} "
                          f"routes {row.get('routes', {})} load {load:.1f} ({time.monotonic() - started:.0f}s)",
                          flush=True)

    summary = {name: {f"{rate:g}": summarize(rows) for rate, rows in by_rate.items()}
               for name, by_rate in results.items()}
    print("\nmedian over rounds [min-max], latency from the scheduled send (ms)")
    for rate in rates:
        for name in names:
            s = summary[name][f"{rate:g}"]
            failed = s["sent"] - s["ok"]
            within = "" if s["within_budget"] is None else f"in budget {s['within_budget'] / s['sent']:.1%}  "
            if args.route_quality:
                s["expected_quality"] = expected_quality(s["routes"], args.route_quality)
                within += f"quality ~{s['expected_quality']:.4f}  "
            print(f"{rate:>6g}/s {name:<10} p50 {s['p50_median']:8.1f} [{s['p50_min']:.1f}-{s['p50_max']:.1f}]  "
                  f"p99 {s['p99_median']:8.1f} [{s['p99_min']:.1f}-{s['p99_max']:.1f}]  failed {failed}/{s['sent']} "
                  f"{s['errors'] or ''}  {within}routes {s['routes']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"variants": dict(args.variant), "rates": rates, "extra": extra,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
