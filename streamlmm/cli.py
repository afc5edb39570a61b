"""Command line: ``streamlmm run | simulate | summary | serve``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    from streamlmm.stream.config import load_config
    from streamlmm.stream.engine import Engine

    flags = {k: v for k, v in vars(args).items() if k not in ("cmd", "config", "func")}
    cfg = load_config(flags, path=args.config)
    engine = Engine(cfg)
    code = engine.run()
    snap = engine.last_snapshot
    if snap is not None:
        sys.stderr.write(f"[streamlmm] final snapshot: {snap!r}\n")
    return code


def _simulate(args: argparse.Namespace) -> int:
    from streamlmm.simulate import simulate, to_jsonl

    out = sys.stdout
    try:
        for line in to_jsonl(simulate(args.events, args.groups, args.seed)):
            out.write(line)
    except BrokenPipeError:
        return 0
    return 0


def _summary(args: argparse.Namespace) -> int:
    from streamlmm.snapshot import Snapshot

    snap = Snapshot.load(args.snapshot_dir)
    d = snap.to_dict(groups=args.groups)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"Linear mixed model fit by {snap.method}: {snap.formula}")
    print(f"  criterion {snap.criterion:.4f}   n_obs {snap.n_obs:g}   groups {snap.n_groups}")
    print(f"  events {snap.n_events}   offsets {dict(snap.offsets)}")
    print("Random effects (variance, sd, correlations):")
    sd = snap.re_cov.diagonal() ** 0.5
    for i, name in enumerate(snap.re_names):
        corr = " ".join(
            f"{snap.re_cov[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else 0.0:6.3f}"
            for j in range(i)
        )
        print(f"  {name:<14s} {sd[i] ** 2:12.6g} {sd[i]:12.6g}  {corr}")
    print(f"  {'Residual':<14s} {snap.sigma**2:12.6g} {snap.sigma:12.6g}")
    print("Fixed effects (estimate, std. error):")
    for k, v in snap.fixef.items():
        print(f"  {k:<14s} {v:12.6g} {snap.fixef_se[k]:12.6g}")
    if snap.singular:
        print("  boundary (singular) fit")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamlmm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="consume a stream into a model; write snapshots")
    r.add_argument("--config", help="TOML file of settings (also STREAMLMM_CONFIG)")
    r.add_argument("--source", help="kafka://HOST:PORT/TOPIC | jsonl:PATH | jsonl:-")
    r.add_argument("--formula", help='lme4 formula, e.g. "y ~ x1 + (1 + x1 | g)"')
    r.add_argument("--method", choices=("REML", "ML"))
    r.add_argument("--snapshot-dir")
    r.add_argument("--consumer-group")
    r.add_argument("--partitions", help="only these partitions of a kafka topic, e.g. 0,2")
    r.add_argument("--snapshot-every-events", type=int)
    r.add_argument("--snapshot-every-seconds", type=float)
    r.add_argument(
        "--dead-letter", help="kafka topic (kafka source), or JSON-lines PATH / jsonl:PATH"
    )
    r.add_argument("--publish-topic", help="compacted topic of per-group effects")
    r.add_argument(
        "--until-end",
        action="store_true",
        default=None,
        help="exit 0 once caught up with the end offsets seen at start",
    )
    r.add_argument("--half-life", type=float, help="forgetting half-life in event-time units")
    r.add_argument("--time-key", help="event-time field (default ts with --half-life)")
    r.add_argument("--missing", choices=("raise", "skip"))
    r.add_argument("--em-every", type=int)
    r.add_argument("--refit-every", type=int)
    r.add_argument("--max-poll-records", type=int)
    r.add_argument("--progress-seconds", type=float)
    r.add_argument("--serve", type=int, metavar="PORT", help="also answer HTTP queries on PORT")
    r.add_argument("--serve-host", help="bind address for --serve (default 127.0.0.1)")
    r.set_defaults(func=_run)

    s = sub.add_parser("simulate", help="write known-truth JSON events to stdout")
    s.add_argument("--events", type=int, default=100_000)
    s.add_argument("--groups", type=int, default=1_000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_simulate)

    m = sub.add_parser("summary", help="print the newest snapshot in a directory")
    m.add_argument("snapshot_dir")
    m.add_argument("--json", action="store_true")
    m.add_argument("--groups", action="store_true", help="include every group's effects")
    m.set_defaults(func=_summary)

    from streamlmm.serve.server import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="answer HTTP queries from a snapshot dir"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamlmm`` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"streamlmm: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
