"""Command line: ``streamlmm run | simulate | summary | plot``."""

from __future__ import annotations

import argparse
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
    r.set_defaults(func=_run)

    from streamlmm.simulate import SCENARIOS, simulate_command

    s = sub.add_parser("simulate", help="write known-truth JSON events (and their truth)")
    s.add_argument("--scenario", choices=SCENARIOS, default="basic")
    s.add_argument("--events", type=int, help="total events (default: the scenario's own)")
    s.add_argument("--groups", type=int, default=1_000, help="groups of the basic scenario")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rate", type=float, help="events per second at most")
    s.add_argument("--to", default="-", help="- | jsonl:PATH | kafka://HOST:PORT/TOPIC")
    s.add_argument("--truth", help="truth file (default: PATH.truth.json beside jsonl:PATH)")
    s.set_defaults(func=simulate_command)

    from streamlmm.summary import summary_command

    m = sub.add_parser("summary", help="lme4-style summary of the newest snapshot in DIR")
    m.add_argument("snapshot_dir")
    m.add_argument("--json", action="store_true")
    m.add_argument("--groups", action="store_true", help="include every group's effects")
    m.add_argument("--vs-truth", metavar="FILE", help="compare with a simulation's truth")
    m.set_defaults(func=summary_command)

    from streamlmm.plot import plot_command

    pl = sub.add_parser("plot", help="PNG pictures of the newest snapshot in DIR")
    pl.add_argument("snapshot_dir")
    pl.add_argument("--out", required=True, help="directory for the PNG files")
    pl.set_defaults(func=plot_command)
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
