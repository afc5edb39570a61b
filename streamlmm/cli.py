"""Command line: ``streamlmm run | fit | serve | simulate | summary | plot`` (also
``python -m streamlmm``).

A user error (bad settings, a missing file or directory, a changed source, an
unreachable broker) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

__all__ = ["main"]


_ENGINE_ONLY = (
    "until_end",
    "new_source",
    "snapshot_every_events",
    "snapshot_every_seconds",
    "serve",
    "serve_host",
    "time_key",
    "em_every",
    "refit_every",
    "kafka_client",
    "stop_after_dead_letters",
)


def _run_worker(args: argparse.Namespace) -> int:
    from streamlmm.stream.config import load_kafka_settings
    from streamlmm.stream.worker import Worker, WorkerConfig

    if not (args.source or "").startswith("kafka://"):
        raise ValueError("--state-topic needs a kafka://HOST:PORT/TOPIC source")
    if not args.formula:
        raise ValueError("missing required setting: --formula")
    if args.half_life is not None or args.partitions:
        raise ValueError("--state-topic does not support --half-life or --partitions")
    for name in _ENGINE_ONLY:  # given but ignored would be worse than refused
        if getattr(args, name, None) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} applies to the engine, not to a scale-out worker (--state-topic)"
            )
    for name in ("max_poll_records", "session_timeout_ms", "transaction_timeout_ms"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if args.progress_seconds is not None and not args.progress_seconds >= 0:
        raise ValueError(f"--progress-seconds must be >= 0, got {args.progress_seconds}")
    kw = {
        k: getattr(args, k)
        for k in (
            "consumer_group",
            "method",
            "missing",
            "levels",
            "dead_letter",
            "max_poll_records",
            "params_topic",
            "publish_topic",
        )
        if getattr(args, k) is not None
    }
    for k in ("progress_seconds", "session_timeout_ms", "transaction_timeout_ms"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    cfg = WorkerConfig(
        source=args.source,
        formula=args.formula,
        state_topic=args.state_topic,
        kafka=load_kafka_settings(args.config),
        **kw,
    )
    return Worker(cfg).run()


def _fit(args: argparse.Namespace) -> int:
    from streamlmm.stream.config import load_kafka_settings
    from streamlmm.stream.fitter import FitterConfig, main_fit

    cfg = FitterConfig(
        state_topic=args.state_topic,
        snapshot_dir=args.snapshot_dir,
        params_topic=args.params_topic,
        bootstrap=args.bootstrap,
        method=args.method,
        every_seconds=args.every_seconds,
        until_caught_up=args.until_caught_up,
        kafka=load_kafka_settings(args.config),
    )
    if not cfg.every_seconds > 0:
        raise ValueError(f"--every-seconds must be > 0, got {cfg.every_seconds}")
    return main_fit(cfg)


def _run(args: argparse.Namespace) -> int:
    import os

    from streamlmm.stream.config import load_config
    from streamlmm.stream.engine import Engine

    if args.state_topic is None:
        args.state_topic = os.environ.get("STREAMLMM_STATE_TOPIC")
    if args.state_topic:
        return _run_worker(args)
    if args.params_topic:
        raise ValueError("--params-topic applies to scale-out workers (with --state-topic)")
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("cmd", "config", "func", "state_topic", "params_topic")
    }
    cfg = load_config(flags, path=args.config)
    engine = Engine(cfg)
    code = engine.run()
    snap = engine.last_snapshot
    if snap is not None:
        sys.stderr.write(f"[streamlmm] final snapshot: {snap!r}\n")
    return code


def _default(name: str) -> str:
    """The engine's default of a ``run`` setting, for the help text."""
    import dataclasses

    from streamlmm.stream.engine import EngineConfig

    f = {f.name: f for f in dataclasses.fields(EngineConfig)}[name]
    if f.default is dataclasses.MISSING or f.default is None:
        return ""
    return f" (default: {f.default})"


def _parser() -> argparse.ArgumentParser:
    from streamlmm import __version__

    p = argparse.ArgumentParser(
        prog="streamlmm",
        description="Exact linear mixed models (lme4's REML/ML) on event streams.",
    )
    p.add_argument("--version", action="version", version=f"streamlmm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="consume a stream into a model; write snapshots",
        description=(
            "Consume a stream into a model and write snapshots. Every setting can also "
            "come from a STREAMLMM_<NAME> environment variable or the TOML file of "
            "--config; a flag wins over the environment, which wins over the file. "
            "Required: --source, --formula, --snapshot-dir (by flag, variable or file)."
        ),
        epilog=(
            "Restarts resume from the newest valid snapshot in --snapshot-dir. A "
            "JSON-lines file must still start with the bytes the snapshot consumed "
            "(checked by length and sha256); stdin must replay the consumed stream from "
            "its start, and only what follows it is new. Otherwise the run is refused "
            "(exit 2) unless --new-source says the source is new data. The last snapshot "
            "(--until-end, SIGTERM, SIGINT) follows a full REML/ML refit."
        ),
    )
    req = r.add_argument_group("required (flag, STREAMLMM_<NAME> or --config file)")
    req.add_argument(
        "--source",
        metavar="SPEC",
        help="kafka://HOST:PORT/TOPIC | jsonl:PATH | jsonl:- (stdin) [required]",
    )
    req.add_argument("--formula", help='lme4 formula, e.g. "y ~ x1 + (1 + x1 | g)" [required]')
    req.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="directory of snapshots, created if missing; one engine per directory (a "
        "second one on it exits 2; readers such as serve need no lock) [required]",
    )
    r.add_argument("--config", metavar="FILE", help="TOML file of settings (also STREAMLMM_CONFIG)")
    r.add_argument("--method", choices=("REML", "ML"), help="criterion" + _default("method"))
    r.add_argument(
        "--consumer-group",
        metavar="ID",
        help="Kafka consumer group the offsets are committed to" + _default("consumer_group"),
    )
    r.add_argument(
        "--partitions",
        metavar="LIST",
        help="only these partitions of a Kafka topic, e.g. 0,2 (default: all)",
    )
    r.add_argument(
        "--kafka-client",
        choices=("auto", "kafka-python", "confluent-kafka"),
        help="Kafka consumer: auto is confluent-kafka when installed (the "
        "'streamlmm[confluent]' extra), else kafka-python" + _default("kafka_client"),
    )
    r.add_argument(
        "--snapshot-every-events",
        type=int,
        metavar="N",
        help="snapshot after this many events, or after --snapshot-every-seconds, whichever "
        "comes first (a crash replays at most that much)" + _default("snapshot_every_events"),
    )
    r.add_argument(
        "--snapshot-every-seconds",
        type=float,
        metavar="S",
        help="snapshot after this many seconds with new events"
        + _default("snapshot_every_seconds"),
    )
    r.add_argument(
        "--dead-letter",
        metavar="DEST",
        help="where bad events go: a Kafka topic (with a Kafka source; transactional, "
        "read it with isolation_level=read_committed), or a JSON-lines PATH / jsonl:PATH, "
        "which holds exactly the dead letters of the events the snapshots hold (cut back "
        "on restart, emptied by a start from no snapshot) (default: logged only)",
    )
    r.add_argument(
        "--publish-topic",
        metavar="TOPIC",
        help="compacted Kafka topic of per-group effects, transactional (default: none)",
    )
    r.add_argument(
        "--until-end",
        action="store_true",
        default=None,
        help="exit 0 once caught up with the end offsets seen at start (default: run "
        "until SIGTERM/SIGINT)",
    )
    r.add_argument(
        "--new-source",
        action="store_true",
        default=None,
        help="the source is new data: read it from its start and learn it on top of the "
        "snapshot, without checking that it is the source the snapshot consumed "
        "(default: off; a changed source is refused)",
    )
    r.add_argument(
        "--half-life",
        type=float,
        metavar="H",
        help="forgetting half-life in event-time units (default: no forgetting)",
    )
    r.add_argument(
        "--time-key",
        metavar="FIELD",
        help="event-time field (default: none; ts with --half-life)",
    )
    r.add_argument(
        "--missing",
        choices=("raise", "skip"),
        help="an event with a missing field: raise = dead letter, skip = drop and count"
        + _default("missing"),
    )
    r.add_argument(
        "--em-every",
        type=int,
        metavar="N",
        help="ML-EM step every N events (default: the model's schedule)",
    )
    r.add_argument(
        "--refit-every",
        type=int,
        metavar="N",
        help="exact refit every N events (default: the model's schedule)",
    )
    r.add_argument(
        "--stop-after-dead-letters",
        type=int,
        metavar="N",
        help="exit 2, with the commonest reason and no snapshot, when the first N events "
        "read are all dead letters (or skipped): a misconfiguration, e.g. --half-life "
        "without a ts field or a misspelled --time-key; also when a run that learned "
        "nothing ends with only dead letters; 0 never stops" + _default("stop_after_dead_letters"),
    )
    r.add_argument(
        "--max-poll-records",
        type=int,
        metavar="N",
        help="records per poll" + _default("max_poll_records"),
    )
    r.add_argument(
        "--progress-seconds",
        type=float,
        metavar="S",
        help="progress line on stderr every S seconds, 0 for none" + _default("progress_seconds"),
    )
    r.add_argument(
        "--levels",
        metavar="JSON",
        help='factor levels, reference first, e.g. \'{"severity": ["mild", "moderate", '
        '"severe"]}\' (default: the order of appearance; scale-out workers should all '
        "declare them, so that their factor columns agree)",
    )
    r.add_argument(
        "--serve",
        type=int,
        metavar="PORT",
        help="also answer HTTP queries on PORT from the engine's own snapshots "
        "(default: no server; see docs/serve.md)",
    )
    r.add_argument(
        "--serve-host",
        metavar="HOST",
        help="bind address for --serve" + _default("serve_host"),
    )
    r.add_argument(
        "--state-topic",
        metavar="TOPIC",
        help="scale-out worker: join --consumer-group, keep the owned partitions' groups "
        "and write their statistics to this compacted topic of the source's cluster, in "
        "one transaction with the offsets (--snapshot-dir is then not used; see "
        "docs/scaleout.md)",
    )
    r.add_argument(
        "--params-topic",
        metavar="TOPIC",
        help="scale-out worker: follow the fitter's parameters (global estimates), so that "
        "--publish-topic effects use them",
    )
    r.add_argument(
        "--session-timeout-ms",
        type=int,
        metavar="MS",
        help="with --state-topic: consumer-group session timeout, i.e. how soon a dead "
        "worker's partitions move (default: 10000)",
    )
    r.add_argument(
        "--transaction-timeout-ms",
        type=int,
        metavar="MS",
        help="with --state-topic: how soon the broker aborts a dead worker's open "
        "transaction (default: 10000)",
    )
    r.set_defaults(func=_run)

    f = sub.add_parser(
        "fit",
        help="scale-out fitter: fit the whole model from the workers' state topic",
        description=(
            "Follow the compacted state topic that `streamlmm run --state-topic` workers "
            "write, fit the whole model exactly (REML/ML), publish the parameters to "
            "--params-topic and write snapshots to --snapshot-dir."
        ),
    )
    f.add_argument(
        "--state-topic", required=True, metavar="SPEC", help="kafka://HOST:PORT/NAME or NAME"
    )
    f.add_argument("--params-topic", metavar="SPEC", help="kafka://HOST:PORT/NAME or NAME")
    f.add_argument(
        "--snapshot-dir",
        required=True,
        metavar="DIR",
        help="where the fitter writes its snapshots of the whole model (what serve and "
        "summary read), created if missing; one writer per directory [required]",
    )
    f.add_argument("--bootstrap", metavar="HOST:PORT", help="brokers, for bare topic names")
    f.add_argument("--method", choices=("REML", "ML"), help="(default: the workers' method)")
    f.add_argument("--every-seconds", type=float, default=10.0, metavar="S", help="(default: 10)")
    f.add_argument(
        "--until-caught-up",
        action="store_true",
        help="fit once the state topic is read to its current end, snapshot, exit",
    )
    f.add_argument("--config", metavar="FILE", help="TOML file with a [kafka] table")
    f.set_defaults(func=_fit)

    from streamlmm.simulate import SCENARIOS, simulate_command

    s = sub.add_parser("simulate", help="write known-truth JSON events (and their truth)")
    s.add_argument("--scenario", choices=SCENARIOS, default="basic", help="(default: basic)")
    s.add_argument("--events", type=int, help="total events (default: the scenario's own)")
    s.add_argument(
        "--groups", type=int, default=1_000, help="groups of the basic scenario (default: 1000)"
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--rate", type=float, help="events per second at most (default: unlimited)")
    s.add_argument(
        "--to", default="-", help="- | jsonl:PATH | kafka://HOST:PORT/TOPIC (default: - stdout)"
    )
    s.add_argument("--truth", help="truth file (default: PATH.truth.json beside jsonl:PATH)")
    s.set_defaults(func=simulate_command)

    from streamlmm.summary import summary_command

    m = sub.add_parser("summary", help="lme4-style summary of the newest snapshot in DIR")
    m.add_argument(
        "snapshot_dir",
        metavar="DIR",
        help="a snapshot directory (its newest valid snapshot) or one snapshot file",
    )
    m.add_argument("--json", action="store_true", help="JSON instead of text")
    m.add_argument("--groups", action="store_true", help="include every group's effects")
    m.add_argument("--vs-truth", metavar="FILE", help="compare with a simulation's truth")
    m.set_defaults(func=summary_command)

    from streamlmm.plot import plot_command

    pl = sub.add_parser("plot", help="PNG pictures of the newest snapshot in DIR")
    pl.add_argument(
        "snapshot_dir",
        metavar="DIR",
        help="a snapshot directory (its newest valid snapshot) or one snapshot file",
    )
    pl.add_argument("--out", required=True, help="directory for the PNG files [required]")
    pl.set_defaults(func=plot_command)

    from streamlmm.serve.server import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="answer HTTP queries from a snapshot dir"))
    return p


def _warnings_as_log_lines() -> None:
    """Python warnings (lme4's checks: ``FitWarning``) as one log line each, without the
    file name and source line that :mod:`warnings` prints by default."""
    log = logging.getLogger("streamlmm")

    def show(message, category, filename, lineno, file=None, line=None):
        log.warning("%s: %s", category.__name__, message)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``streamlmm`` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _warnings_as_log_lines()
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return _reader_went_away()
    except _user_errors() as e:
        sys.stderr.write(f"streamlmm: error: {_one_line(e)}\n")
        return 2


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``streamlmm summary --json | head``): stop
    quietly, as a command whose output is cut short by its reader does. What is left in
    stdout's buffer goes to /dev/null, so that the interpreter's exit does not report
    the broken pipe either."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are about the user's settings or data: a message, not a traceback."""
    errors: list[type[BaseException]] = [ValueError, OSError, RuntimeError]
    try:
        from kafka.errors import KafkaError

        errors.append(KafkaError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    """
    >>> _one_line(ValueError("a\\nb"))
    'a b'
    >>> _one_line(OSError(28, "writing dead letters to /dev/full: No space left on device"))
    'writing dead letters to /dev/full: No space left on device'
    """
    from streamlmm.oserrors import describe

    return describe(e)


if __name__ == "__main__":
    sys.exit(main())
