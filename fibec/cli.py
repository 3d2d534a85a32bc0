"""`fibec run | compare | bench`: federated LoRA fine-tuning with FibecFed and its baselines.

Settings come from FedConfig's defaults (fibec/config.py), then an optional TOML file (--config;
keys are the flag names with dashes or underscores), then the flags. A bad setting exits with
code 2 and one line on stderr naming it. `fibec run --resume OUT` continues the run saved under
OUT with its saved settings.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ._checks import check_number, fraction_count
from .config import METHOD_NAMES, ConfigError, FedConfig, add_arguments, from_arguments, load_toml
from .federated.checkpoint import CheckpointError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fibec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run one method (or a comma list) and write metrics + plots"),
                            ("compare", "run several methods on the same partition and seed")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="TOML file of settings (flags override it)")
        p.add_argument("--resume", metavar="OUT", help="continue the run saved under OUT with its saved settings")
        p.add_argument("--overwrite", action="store_true", help="start over in an --out folder that holds a run")
        p.add_argument("--fraction", type=float, help="fraction of clients per round (instead of --clients-per-round)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_arguments(p)
        if name == "compare":
            p.add_argument("--methods", dest="method", help=f"comma list of methods: {', '.join(METHOD_NAMES)}")
    sub.add_parser("bench", help="run the microbenchmarks (pytest bench)")
    return parser


def build_config(args: argparse.Namespace) -> FedConfig:
    """Defaults < TOML file < flags; or, with --resume, the saved config of that run."""
    given = [name for name, value in vars(args).items()
             if value is not None and name not in ("command", "resume", "quiet", "overwrite", "config")]
    if args.resume:
        from .federated.runner import saved_config

        if given or args.config:
            flag = f"--{(given or ['config'])[0].replace('_', '-')}"
            raise ConfigError(f"--resume continues with the saved settings of {args.resume}; drop {flag}")
        return saved_config(args.resume)
    base = load_toml(args.config) if args.config else {}
    if args.command == "compare" and args.method is None and not any(k in base for k in ("method", "methods")):
        base = {**base, "method": "fibecfed,fedavg"}
    cfg = from_arguments(args, base)
    if args.fraction is not None:  # a flag only, not a setting: it sets clients_per_round
        try:
            fraction = check_number("--fraction", args.fraction, low=0.0, high=1.0, low_open=True)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        cfg = cfg.replace(clients_per_round=fraction_count(fraction, cfg.clients))
    return cfg


def run(cfg: FedConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """Run every method of cfg (in process or on Flower), then print the table and write the plots."""
    from . import report

    if cfg.engine == "flower":
        from .federated.flower_local import run_methods
    else:
        from .federated.runner import run_methods
    results = run_methods(cfg, overwrite=overwrite, progress=progress)
    out_dir = Path(cfg.out)
    rows = report.summarise(results)
    report.write_summary(rows, out_dir)
    plots = report.plot(results, out_dir)
    print(report.format_table(rows))
    print(f"metrics, summary and plots in {out_dir}/ ({', '.join(p.name for p in plots)})")
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        bench = Path(__file__).resolve().parents[1] / "bench"
        if not bench.is_dir():
            print("fibec bench: no bench/ folder next to the package; run `pytest bench` in the repository",
                  file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, "-m", "pytest", str(bench), "-q"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = build_config(args)
        run(cfg, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, CheckpointError) as err:
        print(f"fibec {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
