"""``mmlearn evaluate --config RUN/config.yaml --ckpt_path CKPT [--missing ...] [--subsets ...]``.

The run's model and data are built by the same LightningCLI as ``mmlearn test`` (its config,
the checkpoint's model options, the same checks of a checkpoint against the data), then
:func:`~mmlearn.evaluation.evaluate.evaluate` runs instead of ``Trainer.test`` and its files go to
``--out`` (default ``RUN/evaluate/<checkpoint name>/``). The tables and the PNG also go to the
run's W&B logger when its config has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import WandbLogger

from mmlearn.data.base import stored_input_means
from mmlearn.errors import MMLearnError
from mmlearn.evaluation import eval_files
from mmlearn.evaluation.compare import writable_folder
from mmlearn.evaluation.evaluate import METRICS, Evaluation, check_options, evaluate
from mmlearn.evaluation.features import SEMANTICS
from mmlearn.lightning_cli import MMLearnCLI, build_cli, read_checkpoint
from mmlearn.run_folder import find_run, place_run, shown

USAGE = (
    "mmlearn evaluate --config RUN/config.yaml --ckpt_path CKPT [--missing S ...] "
    "[--subsets a+b ...] [--metric acc] [--probes true|false] [--out DIR]"
)


class EvaluateCLI(MMLearnCLI):
    """The ``test`` subcommand's CLI, whose run is an evaluation (module docstring)."""

    result: Evaluation | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--missing",
            type=list[str] | str | None,
            default=None,
            help=f"the meanings of a missing modality, from {list(SEMANTICS)} (default: all; "
            "those the strategy cannot do are marked)",
        )
        parser.add_argument(
            "--subsets",
            type=list[str] | str | None,
            default=None,
            help="subsets of present modalities, each joined by '+' (default: every non-empty "
            "subset up to 6 modalities)",
        )
        parser.add_argument(
            "--metric", type=str, default="acc", help=f"the Shapley values' metric: {METRICS}"
        )
        parser.add_argument(
            "--probes", type=bool, default=True, help="fit a linear probe on every encoder"
        )
        parser.add_argument(
            "--out", type=str | None, default=None, help="default RUN/evaluate/<checkpoint>/"
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="replace an evaluation of other options or data in --out (default: refuse)",
        )

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        cfg = self.config[self.subcommand]
        place_run(cfg, "evaluate")  # W&B job type "evaluate"; CSV files in RUN/evaluate/

    def after_test(self) -> None:
        return None

    def test(self, **kwargs: Any) -> None:
        """Evaluate ``--ckpt_path`` on the test split and write the files."""
        cfg = self.config["test"]
        ckpt = cfg.get("ckpt_path")
        if not ckpt or str(ckpt) in ("best", "last", "hpc", "registry"):
            raise MMLearnError(f"mmlearn evaluate needs --ckpt_path CKPT (a file); usage: {USAGE}")
        checkpoint = read_checkpoint(str(ckpt))
        model, dm = self.model, self.datamodule
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        means = stored_input_means(checkpoint)
        source = "stored with the run (its checkpoint)" if means is not None else None
        missing = as_list(cfg.get("missing"))
        subsets = as_list(cfg.get("subsets"))
        options = {"missing": missing, "subsets": subsets, "metric": cfg.get("metric", "acc")}
        options |= {"probes": bool(cfg.get("probes", True))}
        data = yaml.safe_load(self._parser("test").dump(cfg, skip_none=False)).get("data")
        out = Path(cfg.out) if cfg.get("out") else default_out(str(ckpt))
        extra = {"checkpoint": str(ckpt), "data": type(dm).__name__, "data_config": data}
        extra |= {"evaluate_options": options}
        split = None if subsets is None else [x.split("+") for x in subsets]
        check_options(model, missing, split, str(options["metric"]))  # before touching --out
        check_out(out, extra, bool(cfg.get("overwrite")), "--out" if cfg.get("out") else None)
        device = self.trainer.strategy.root_device
        self.result = evaluate(
            model,
            dm,
            missing=missing,
            subsets=split,
            metric=cfg.get("metric", "acc"),
            probes=bool(cfg.get("probes", True)),
            device=device,
            input_means=means,
            means_source=source,
        )
        files = eval_files.write(self.result, out, extra)
        log_to_wandb(self.trainer.loggers, self.result, out, finish=True)
        print(eval_files.console(self.result, [Path(shown(f)) for f in files]), flush=True)


def as_list(value: object) -> list[str] | None:
    """A list option as given: ``[a, b+c]``, or one string ``a`` / ``a,b+c`` without brackets."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def check_out(out: Path, extra: dict[str, Any], overwrite: bool, option: str | None) -> None:
    """Refuse an ``out`` that cannot be written, or that holds another evaluation.

    An earlier ``evaluation.json`` of the same checkpoint, data options and evaluate options
    (the same result) is replaced; one of other options only with ``--overwrite``: a partial
    evaluation must not silently replace a full one that ``compare --collect`` reads.
    """
    where = f"{option or 'the evaluation folder'} {shown(out)}"
    earlier = out / "evaluation.json"
    if earlier.is_file() and not overwrite:
        try:
            saved = json.loads(earlier.read_text())
        except (OSError, ValueError):
            saved = {}
        keys = ("checkpoint", "data_config", "evaluate_options")
        differ = [k for k in keys if saved.get(k) != json.loads(json.dumps(extra.get(k)))]
        if differ:
            raise MMLearnError(
                f"{where} holds an evaluation with other {', '.join(differ)}: "
                "give another --out, or --overwrite true to replace it"
            )
    writable_folder(out, where, "; give another --out")


def default_out(ckpt: str) -> Path:
    """``RUN/evaluate/<checkpoint name>/``; a checkpoint of no run: beside it."""
    run = find_run(ckpt)
    stem = Path(ckpt).stem
    return (run / "evaluate" / stem) if run is not None else Path(ckpt).parent / f"evaluate-{stem}"


def log_to_wandb(
    loggers: Sequence[Any], result: Evaluation, out: Path, finish: bool = False
) -> None:
    """The tables and PNGs of an evaluation, to every W&B logger of the run (``finish``: then
    close the W&B run: no Trainer run will)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            keys = eval_files.metric_keys(result)
            names = ["semantics", "subset", "size", *keys, "note"]
            data = [[r.get(c, None) for c in names] for r in result.rows]
            cols = list[str | int](names)
            logger.experiment.log(
                {
                    "evaluate/missing": wandb.Table(columns=cols, data=data),
                    "evaluate/reliability": wandb.Image(str(out / "reliability.png")),
                    "evaluate/summary": wandb.Html(
                        "<pre>" + (out / "summary.md").read_text() + "</pre>"
                    ),
                }
                | {f"evaluate/{k}": v for k, v in result.full().items() if k in keys}
            )
            if finish:
                logger.experiment.finish()


def evaluate_main(argv: Sequence[str]) -> int:
    """Evaluate a checkpoint: missing modalities, calibration, Shapley values, probes."""
    if any(a in ("-h", "--help") for a in argv):
        build_cli(["test", "--help"], cli_class=EvaluateCLI)
        return 0
    from mmlearn.cli import check_choices, check_config_files

    args = ["test", *argv]
    check_config_files(args)
    check_choices(args)
    torch.set_grad_enabled(False)
    try:
        build_cli(args, cli_class=EvaluateCLI)
    finally:
        torch.set_grad_enabled(True)
    return 0


def _parser() -> argparse.ArgumentParser:  # for `mmlearn --help`'s one line only
    return argparse.ArgumentParser(prog="mmlearn evaluate", usage=USAGE)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(evaluate_main(sys.argv[1:]))
