"""The ``fastrlhf`` command (also ``python -m fastrlhf``): argparse subcommands -> a config ->
one library call. No logic of its own.

Every config-driven subcommand takes ``--config FILE.yaml`` and ``--<field> VALUE`` for every field
of its config (dotted for nested ones: ``--guardrails.action stop``), prints each field's help and
default in ``--help``, refuses an unknown field or an invalid value before any heavy work, and
shows the resolved config with ``--print-config``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from pathlib import Path

from fastrlhf.config import Config, ConfigError, field_docs

EPILOG = "Every --field also reads from --config FILE.yaml; values on the command line win."


def _commands() -> dict[str, tuple[type[Config] | None, Callable, str]]:
    """name -> (config class or None, the library call, one-line help). Imported lazily: --help of
    one command does not import torch-heavy modules of the others."""
    from fastrlhf import demo, loop, runs

    return {
        "demo": (demo.DemoConfig, demo.run_demo, "the offline demo: improve SmolLM2 from simulated human + AI "
                                                 "feedback, and a tiny model on arithmetic"),
        "sft": (runs.SFTRun, runs.run_sft, "supervised fine-tuning on text / prompt-completion rows"),
        "rm": (runs.RewardRun, runs.run_reward, "train a reward model on preference / rating / binary rows"),
        "ppo": (runs.PPORun, runs.run_ppo, "PPO against judges"),
        "grpo": (runs.GRPORun, runs.run_grpo, "GRPO / Dr. GRPO / RLOO / REINFORCE++ against judges"),
        "dpo": (runs.DPORun, runs.run_dpo, "DPO / IPO / hinge on preference rows"),
        "loop": (loop.LoopConfig, loop.run_loop, "the iterative loop: sample -> feedback -> reward model -> "
                                                 "policy -> evaluate, for N rounds"),
        "label": (loop.LabelConfig, loop.run_label, "label pairs in the terminal or a local web page"),
    }


def _fmt_default(v) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "[]"
    return str(v)


def add_config_args(p: argparse.ArgumentParser, cls: type[Config]) -> None:
    """``--config``, ``--print-config`` and one ``--field`` option per (dotted) field of ``cls``."""
    p.add_argument("--config", metavar="FILE.yaml", help="read the config from a YAML file (fields as below)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    group = p.add_argument_group("config fields")
    for name, type_name, default, help_text in field_docs(cls):
        group.add_argument(f"--{name}", dest=f"field:{name}", metavar=type_name.upper().replace(" ", "_")[:24]
                           if not type_name.startswith("one of") else "{" + type_name[7:].replace("'", "") + "}",
                           help=f"{help_text} (default: {_fmt_default(default)})".replace("%", "%%"))  # argparse


def resolve(cls: type[Config], ns: argparse.Namespace) -> Config:
    """The config of a parsed command line: defaults, then ``--config``, then ``--field`` values."""
    cfg = cls.from_yaml(ns.config) if getattr(ns, "config", None) else cls()
    overrides = {k.split(":", 1)[1]: v for k, v in vars(ns).items() if k.startswith("field:") and v is not None}
    return cfg.with_overrides(overrides) if overrides else cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # suggest the closest field for a typo
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0]
            known = [a for a in self._option_string_actions if a.startswith("--")]
            close = difflib.get_close_matches(bad.split("=")[0], known, n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown option from the top-level parser, which knows none of the
        # subcommand's fields; report it from the subcommand's parser so the suggestion can find them
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            target = self.commands.get(getattr(ns, "command", None), self) if hasattr(self, "commands") else self
            target.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastrlhf", description="Train language models from human and AI feedback.",
                     epilog="Run 'fastrlhf <command> --help' for a command's fields.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    parser.commands = {}
    for name, (cls, _, help_text) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        add_config_args(p, cls)
        parser.commands[name] = p
    plot = sub.add_parser("plot", help="PNG charts and report.md of a run directory",
                          description="Write RUN_DIR/plots/*.png and RUN_DIR/report.md from the run's metrics.")
    plot.add_argument("run_dir", help="a run directory (an output_dir of a trainer, the loop or the demo)")
    bench = sub.add_parser("bench", help="the microbenchmarks (bench/all.py of a source checkout)",
                           description="Run bench/all.py of the fastrlhf source tree; arguments are passed on.")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench/all.py (e.g. --quick --only gae)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "plot":
        return _plot(ns.run_dir)
    if ns.command == "bench":
        return _bench(ns.args)
    cls, fn, _ = _commands()[ns.command]
    try:
        cfg = resolve(cls, ns)
    except ConfigError as e:
        print(f"fastrlhf {ns.command}: {e}", file=sys.stderr)
        return 2
    if ns.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from fastrlhf.runtime import retain_freed_memory

    retain_freed_memory()  # training steps reuse freed memory instead of faulting fresh pages in
    try:
        fn(cfg, resume=ns.resume)
    except ConfigError as e:  # a value only the run can check (a missing file, a judge spec)
        print(f"fastrlhf {ns.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastrlhf {ns.command}: interrupted; the last checkpoint is intact (--resume continues it)",
              file=sys.stderr)
        return 130
    return 0


def _plot(run_dir: str) -> int:
    from fastrlhf.report import plot_run, write_report

    path = Path(run_dir)
    if not path.is_dir():
        print(f"fastrlhf plot: {run_dir}: no such directory", file=sys.stderr)
        return 2
    pngs = plot_run(path)
    report = write_report(path)
    print(f"wrote {len(pngs)} charts under {path / 'plots'} and {report}")
    return 0


def _bench(args: list[str]) -> int:
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / "all.py"
    if not script.exists():
        print("fastrlhf bench: the benchmarks live in the repository's bench/ folder, which this installation "
              f"does not have ({script} is missing); run it from a source checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args])


if __name__ == "__main__":
    sys.exit(main())
