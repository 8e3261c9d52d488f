"""The `clorch` command line. User mistakes end in one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from workloads.config import ConfigError
from workloads.data.sources import DataError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clorch", description="Continual-learning experiments around the "
                                     "Discrete Key-Value Bottleneck.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment file's base config once, in this process (no Ray)")
    run.add_argument("file", help="experiment YAML file (its base: block is run)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set learner.num_keys=512 (repeatable)")
    run.add_argument("--output", metavar="JSON", help="write the accuracy matrix, metrics and resolved config here")
    run.add_argument("-q", "--quiet", action="store_true", help="only the per-stage table and the summary")
    cache = sub.add_parser("cache", help="precompute the embeddings and DKVB keys an experiment file needs")
    cache.add_argument("file", help="experiment YAML file")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    return parser


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def cmd_run(args) -> int:
    from orchestrator.config import load_experiment
    from workloads.runner import run_stream

    experiment = load_experiment(args.file, args.overrides)
    config = experiment.base
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.exists():
        raise ConfigError(f"--output: folder {output.parent} does not exist")
    print(f"clorch run {args.file}: learner {config.learner.name}, data {config.data.source}, seed {config.seed}")
    print(f"{'stage':>5}  {'classes':<16} {'seen acc':>8} {'loss':>8} {'time':>8}")

    def on_stage_end(stage: int, m: dict, state: dict) -> None:
        classes = ",".join(str(c) for c in m["classes"])
        print(f"{stage + 1:>5}  {classes:<16} {_fmt(m['accuracy_on_seen_classes']):>8} {m['loss']:>8.4f} "
              f"{m['seconds']:>7.1f}s", flush=True)

    t0 = time.perf_counter()
    result = run_stream(config, on_stage_end=on_stage_end)
    m = result.metrics
    print(f"average accuracy {_fmt(m['average_accuracy'])}  average incremental accuracy "
          f"{_fmt(m['average_incremental_accuracy'])}  forgetting {_fmt(m['forgetting'])}  bwt {_fmt(m['bwt'])}  "
          f"({time.perf_counter() - t0:.1f}s)")
    if output is not None:
        output.write_text(json.dumps(result.to_json(), indent=2))
        print(f"results written to {output}")
    return 0


def cmd_cache(args) -> int:
    from orchestrator.config import load_experiment
    from workloads.runner import precompute

    experiment = load_experiment(args.file, args.overrides)
    configs, sampled = experiment.cache_configs()
    print(f"clorch cache {args.file}: {len(configs)} config(s) with distinct caches")
    if sampled:
        print(f"note: sampled axes {', '.join(sampled)} change the caches; their trials fill them as they run")
    for i, config in enumerate(configs, 1):
        report = precompute(config)
        print(f"[{i}/{len(configs)}] {report}", flush=True)
    return 0


COMMANDS = {"run": cmd_run, "cache": cmd_cache}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clorch` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="[clorch] %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as e:
        print(f"clorch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clorch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
